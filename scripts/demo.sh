#!/usr/bin/env bash
# `make demo`: a first answer without Docker, in one command. Starts what is missing
# (RabbitMQ with the llmq user and Redis, as `make services` does), builds llmq, starts the
# mock upstream and one worker in the background, sends one request and prints its result.
# The mock and the worker keep running; `make demo-stop` (this script's `stop`) stops them.
#
# Usage: scripts/demo.sh [start|stop]
#   LLMQ_DEMO_DIR   pid files and logs (default target/demo)
#   LLMQ_DEMO_MOCK  the mock's address (default 127.0.0.1:8080)
#   LLMQ_DEMO_ADMIN the worker's admin address, for /readyz (default 127.0.0.1:9090)
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${LLMQ_DEMO_DIR:-target/demo}"
MOCK="${LLMQ_DEMO_MOCK:-127.0.0.1:8080}"
ADMIN="${LLMQ_DEMO_ADMIN:-127.0.0.1:9090}"
BIN=target/debug/llmq

log() { echo "demo: $*" >&2; }

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

stop() {
  local what pid
  for what in worker mock; do
    if running "$what"; then
      pid="$(cat "$DIR/$what.pid")"
      kill -TERM "$pid"
      # The worker drains for up to worker.shutdown_grace_secs.
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      log "$what stopped"
    fi
    rm -f "$DIR/$what.pid"
  done
}

start() {
  scripts/ensure-services.sh >&2
  cargo build --quiet
  mkdir -p "$DIR"
  # Every setting the demo needs, on top of the defaults (no ./config.toml is read from
  # here, so a local one cannot change what the demo shows).
  export LLMQ_LLM__BASE_URL="http://$MOCK/v1"
  export LLMQ_ADMIN__ADDR="$ADMIN"
  export LLMQ_AMQP__URL="${AMQP_URL:-amqp://llmq:llmq@127.0.0.1:5672/%2f}"
  if ! running mock; then
    "$BIN" mock-llm --addr "$MOCK" >"$DIR/mock.log" 2>&1 &
    echo $! >"$DIR/mock.pid"
    log "mock upstream at http://$MOCK (log: $DIR/mock.log)"
  fi
  if ! running worker; then
    (cd "$DIR" && exec "$OLDPWD/$BIN" run) >"$DIR/worker.log" 2>&1 &
    echo $! >"$DIR/worker.pid"
    log "worker started (log: $DIR/worker.log)"
  fi
  for _ in $(seq 1 150); do
    "$BIN" probe "http://$ADMIN/readyz" 2>/dev/null && break
    running worker || { log "the worker exited; its log:"; cat "$DIR/worker.log" >&2; exit 1; }
    sleep 0.2
  done
  "$BIN" probe "http://$ADMIN/readyz" || { log "the worker is not ready after 30 s (log: $DIR/worker.log)"; exit 1; }
  log "sending: Hello from the demo"
  (cd "$DIR" && "$OLDPWD/$BIN" publish "Hello from the demo" --wait --timeout-secs 30)
  log "the mock and the worker keep running; stop them with: make demo-stop"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 64 ;;
esac
