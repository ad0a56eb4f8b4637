#!/usr/bin/env bash
# Makes sure the services the tests talk to answer: RabbitMQ at AMQP_URL (default
# 127.0.0.1:5672) and Redis at REDIS_URL (default 127.0.0.1:6379). A service that does not
# answer on this machine is started (its Debian package installed first when missing and we
# are root); one on another host must already run.
set -euo pipefail

# host and port of a URL like scheme://user:pass@host:port/path
host_port() {
  local rest="${1#*://}"
  rest="${rest#*@}"
  rest="${rest%%/*}"
  rest="${rest%%\?*}"
  local host="${rest%:*}" port="${rest##*:}"
  [ "$host" = "$rest" ] && port="$2"
  echo "${host:-127.0.0.1} $port"
}

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# ensure NAME HOST PORT BINARY PACKAGE START-COMMAND...
ensure() {
  local name="$1" host="$2" port="$3" binary="$4" package="$5"
  shift 5
  if answers "$host" "$port"; then
    echo "$name: answers at $host:$port"
    return 0
  fi
  case "$host" in
    127.*|localhost|::1) ;;
    *) echo "$name: nothing answers at $host:$port and it is not this machine" >&2; return 1 ;;
  esac
  if ! command -v "$binary" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "$name: installing $package"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
    else
      echo "$name: not running at $host:$port and $binary is not installed" >&2
      return 1
    fi
  fi
  echo "$name: starting"
  "$@" || true
  for _ in $(seq 1 120); do
    if answers "$host" "$port"; then
      echo "$name: up at $host:$port"
      return 0
    fi
    sleep 1
  done
  echo "$name: did not come up at $host:$port within 120 s" >&2
  return 1
}

AMQP_URL="${AMQP_URL:-amqp://llmq:llmq@127.0.0.1:5672/%2f}"
read -r amqp_host amqp_port < <(host_port "$AMQP_URL" 5672)
read -r redis_host redis_port < <(host_port "${REDIS_URL:-redis://127.0.0.1:6379}" 6379)

ensure RabbitMQ "$amqp_host" "$amqp_port" rabbitmq-server rabbitmq-server \
  rabbitmq-server -detached
ensure Redis "$redis_host" "$redis_port" redis-server redis-server \
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no

# The worker's RabbitMQ user needs the `impersonator` tag: every republish of a request keeps
# its sender's user_id, as in rabbitmq/definitions.json. On this machine's broker the user of
# AMQP_URL (llmq/llmq by default) is created with it when missing; guest is left alone.
ensure_worker_user() {
  local creds="${AMQP_URL#*://}"
  case "$creds" in *@*) creds="${creds%%@*}" ;; *) return 0 ;; esac
  local user="${creds%%:*}" pass="${creds#*:}"
  case "$amqp_host" in 127.*|localhost|::1) ;; *) return 0 ;; esac
  [ "$user" = guest ] && { echo "RabbitMQ: AMQP_URL uses guest, which lacks the impersonator tag" >&2; return 0; }
  command -v rabbitmqctl >/dev/null 2>&1 || return 0
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  if ! rabbitmqctl -q list_users 2>/dev/null | awk '{print $1}' | grep -qx "$user"; then
    rabbitmqctl -q add_user "$user" "$pass" >/dev/null
    echo "RabbitMQ: created user $user"
  fi
  rabbitmqctl -q set_user_tags "$user" administrator impersonator >/dev/null
  rabbitmqctl -q set_permissions -p / "$user" ".*" ".*" ".*" >/dev/null
  echo "RabbitMQ: user $user has the administrator and impersonator tags"
}
ensure_worker_user
