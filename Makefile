# llmq: `make test` runs every test against a real RabbitMQ (started when none answers).
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
export AMQP_URL
VENV := .venv
PYTHON ?= python3
INTEROP_PYTHON := $(CURDIR)/$(VENV)/bin/python
export INTEROP_PYTHON

.PHONY: test lint fmt build run mock broker venv compose-config clean

## Every test: unit, integration (real broker), the Python interop client, the compose file.
test: broker venv
	@if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --all-targets --no-fail-fast; \
	else \
		cargo test --all-targets --no-fail-fast; \
	fi

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

broker:
	@scripts/ensure-broker.sh

## A venv with aio-pika for tests/interop (from PyPI).
venv: $(VENV)/.installed
$(VENV)/.installed: tests/interop/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
	@touch $@

## Validates docker-compose.yml (needs Debian's docker-compose package).
compose-config:
	docker-compose -f docker-compose.yml config --quiet

clean:
	cargo clean
	rm -rf $(VENV)
