# llmq: `make test` runs every test against a real RabbitMQ and Redis (started when they do not answer).
AMQP_URL ?= amqp://llmq:llmq@127.0.0.1:5672/%2f
REDIS_URL ?= redis://127.0.0.1:6379
export AMQP_URL REDIS_URL
VENV := .venv
PYTHON ?= python3
INTEROP_PYTHON := $(CURDIR)/$(VENV)/bin/python
export INTEROP_PYTHON

.PHONY: test lint fmt build run mock services venv compose-config deploy-check bench clean demo demo-stop

## Every test: unit, integration (real broker), the Python interop client, the compose file.
## The node-loss tests run on a local three-node RabbitMQ cluster (scripts/cluster.sh),
## started for the run when it is not up and stopped after it, whatever the outcome; the
## script gives the tests its addresses in LLMQ_TEST_CLUSTER_URLS. Then the end-to-end,
## faults and guarantees suites run again with quorum queues on the cluster's node 1.
SUITES_ON_QUORUM := end_to_end faults guarantees
ON_QUORUM := AMQP_URL="$${LLMQ_TEST_CLUSTER_URLS%%,*}" LLMQ_TEST_QUEUE_TYPE=quorum \
	LLMQ_TEST_RABBITMQ_NODE=llmq-c1@localhost
test: services venv compose-config deploy-check
	@scripts/cluster.sh with sh -c '\
	if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --all-targets --no-fail-fast; all=$$?; \
		$(ON_QUORUM) cargo nextest run --test it --no-fail-fast \
			-E "$(foreach s,$(SUITES_ON_QUORUM),test(/^$(s)::/) |) none()"; quorum=$$?; \
	else \
		cargo test --all-targets --no-fail-fast -- --skip alarm:: && \
		cargo test --test it --no-fail-fast alarm:: -- --test-threads=1; all=$$?; \
		$(ON_QUORUM) cargo test --test it --no-fail-fast -- $(SUITES_ON_QUORUM:%=%::); quorum=$$?; \
	fi; \
	[ $$all = 0 ] && [ $$quorum = 0 ]'

## fmt and clippy, warnings denied.
lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

build:
	cargo build --release

## A worker against the local broker (start `make mock` first, or point LLMQ_LLM__BASE_URL elsewhere).
run:
	cargo run --release -- run

mock:
	cargo run --release -- mock-llm --addr 127.0.0.1:8080

## A first answer without Docker: RabbitMQ (with the llmq user) and Redis when missing, the
## mock and a worker in the background, one request and its result; they keep running.
demo:
	@scripts/demo.sh start

## Stops what `make demo` started.
demo-stop:
	@scripts/demo.sh stop

## RabbitMQ and Redis for the tests (started when they do not answer).
services:
	@scripts/ensure-services.sh

## Broker ceiling vs the worker, latency, memory, batching, CPU per job, memory with 10 000
## calls in flight over HTTP/1.1 (h) and HTTP/2 (h2), 300 streams to reply_to (s), fair
## share between tenants with lanes and without (t), classic vs quorum queues on a cluster (q):
## one run, a table and target/bench.json.
## (h) holds a socket per call in the bench (mock) and in the worker, hence the raised
## open-files limit.
## (q) runs on the local three-node cluster (scripts/cluster.sh), started for the run when
## it is not up and stopped after it.
bench: services
	cargo build --release
	ulimit -n 65536 2>/dev/null || ulimit -n "$$(ulimit -Hn)"; \
	scripts/cluster.sh with sh -c \
		'target/release/llmq bench --json target/bench.json --cluster-urls "$$LLMQ_TEST_CLUSTER_URLS"'

## A venv with aio-pika for tests/interop (from PyPI).
venv: $(VENV)/.installed
$(VENV)/.installed: tests/interop/requirements.txt tests/interop/deploy-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt -r tests/interop/deploy-requirements.txt
	@touch $@

## Kubernetes (schemas shipped by kubernetes-validate; KEDA and RabbitmqCluster structurally;
## kustomize overlays built and their patched objects checked), Grafana and Prometheus files
## under deploy/.
deploy-check: venv
	PYTHON=$(VENV)/bin/python scripts/validate-deploy.sh

## Validates docker-compose.yml with Debian's docker-compose (installed when missing and root),
## with each profile, and checks the cluster profile against rabbitmq/ (node names, definitions).
compose-config: venv
	@command -v docker-compose >/dev/null 2>&1 || { \
		[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }
	docker-compose -f docker-compose.yml config --quiet
	docker-compose -f docker-compose.yml --profile monitoring config --quiet
	docker-compose -f docker-compose.yml --profile cluster config --quiet
	$(VENV)/bin/python scripts/check-compose-cluster.py
	@echo "compose: docker-compose.yml is valid (without a profile, with monitoring, with cluster)"

clean:
	cargo clean
	rm -rf $(VENV)
