#!/usr/bin/env bash
# Makes sure a RabbitMQ answers at AMQP_URL (default 127.0.0.1:5672): when none does and the
# URL points at this machine, starts the local rabbitmq-server (installing Debian's package
# first if it is missing and we are root), then waits for it.
set -euo pipefail

url="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
hostport="${url#*://}"
hostport="${hostport#*@}"
hostport="${hostport%%/*}"
hostport="${hostport%%\?*}"
host="${hostport%:*}"
port="${hostport##*:}"
[ "$host" = "$hostport" ] && port=5672
[ -n "$host" ] || host=127.0.0.1

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; }

if answers; then
  echo "broker: RabbitMQ answers at $host:$port"
  exit 0
fi
case "$host" in
  127.*|localhost|::1) ;;
  *) echo "broker: nothing answers at $host:$port and it is not this machine" >&2; exit 1 ;;
esac
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "broker: installing rabbitmq-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  else
    echo "broker: no RabbitMQ at $host:$port and rabbitmq-server is not installed" >&2
    exit 1
  fi
fi
echo "broker: starting rabbitmq-server"
rabbitmq-server -detached || true
for _ in $(seq 1 120); do
  if answers; then
    echo "broker: RabbitMQ is up at $host:$port"
    exit 0
  fi
  sleep 1
done
echo "broker: RabbitMQ did not come up at $host:$port within 120 s" >&2
exit 1
