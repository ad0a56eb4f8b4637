#!/usr/bin/env bash
# A local three-node RabbitMQ cluster for the node-loss tests, beside the single broker the
# other tests use (127.0.0.1:5672, which this script never touches). It runs the Debian
# package's rabbitmq-server with node names, ports and folders of its own:
#
#   node N (1..3)  llmq-cN@localhost, AMQP on 127.0.0.1:(5680+N), distribution on 25680+N,
#                  data, logs and config under /tmp/llmq-cluster/cN
#
# Usage: scripts/cluster.sh start | stop | status | urls | kill N | shutdown N | restart N
#                           | leader QUEUE | ctl N ARGS... | with COMMAND...
#   start      starts the cluster (does nothing when all three nodes answer; restarts the
#              missing ones when only some do) and prints the nodes' AMQP URLs
#   stop       stops the three nodes and removes their folders
#   status     one line per node; exits 1 unless all three answer
#   urls       the AMQP URLs, comma-separated (LLMQ_TEST_CLUSTER_URLS for the tests)
#   kill N     SIGKILLs node N (the node-loss tests' broker crash)
#   shutdown N stops node N gracefully, as a rolling upgrade does (its folders stay)
#   restart N  starts node N again and waits until it is back in the cluster
#   leader Q   the number of the node holding quorum queue Q's leader (empty when none)
#   ctl N ...  rabbitmqctl against node N, as the user and with the cookie the nodes use
#   with CMD   runs CMD with the cluster up, starting it first when absent and stopping it
#              afterwards (only if this call started it), whatever CMD's exit status
#
# LLMQ_CLUSTER_DIR (default /tmp/llmq-cluster) and LLMQ_CLUSTER_PORT (node 1's AMQP port,
# default 5681; nodes 2 and 3 take the next two) move it elsewhere; the node names stay, so
# one such cluster runs on a machine at a time. Run as root, the nodes
# run as the `rabbitmq` user with the main broker's Erlang cookie (/var/lib/rabbitmq), so the
# package's rabbitmqctl reaches them; run as another user, they run as that user with the
# cookie in its home.
set -euo pipefail

DIR="${LLMQ_CLUSTER_DIR:-/tmp/llmq-cluster}"
PORT="${LLMQ_CLUSTER_PORT:-5681}"
NODES=(1 2 3)
RABBIT_BIN=/usr/lib/rabbitmq/bin
# Every wait is bounded: a node that is not up by then has failed.
BOOT_TIMEOUT=120

node_name() { echo "llmq-c$1@localhost"; }
amqp_port() { echo $((PORT + $1 - 1)); }
dist_port() { echo $((PORT + 20000 + $1 - 1)); }
node_dir() { echo "$DIR/c$1"; }
url() { echo "amqp://llmq:llmq@127.0.0.1:$(amqp_port "$1")/%2f"; }

log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

check_node_number() {
  case "${1:-}" in
    1|2|3) ;;
    *) die "node number must be 1, 2 or 3, not '${1:-}'" ;;
  esac
}

# Runs "$@" as the user the nodes run as, in a clean environment (the caller's RABBITMQ_*
# variables, or the tests' AMQP_URL, must not leak into a node). As root that is `rabbitmq`,
# whose home holds the Erlang cookie every node and rabbitmqctl share.
as_node_user() {
  local base=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8)
  if [ "$(id -u)" = 0 ]; then
    runuser -u rabbitmq -- env -i "${base[@]}" HOME=/var/lib/rabbitmq "$@"
  else
    env -i "${base[@]}" HOME="$HOME" "$@"
  fi
}

# The environment of node N: every path under its own folder, its own env file (so the
# main broker's /etc/rabbitmq/rabbitmq-env.conf, which names rabbit@localhost, is not read).
node_env() {
  local n="$1" d
  d="$(node_dir "$n")"
  echo "RABBITMQ_NODENAME=$(node_name "$n")"
  echo "RABBITMQ_USE_LONGNAME=false"
  echo "RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf"
  echo "RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf"
  echo "RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config"
  echo "RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins"
  echo "RABBITMQ_MNESIA_BASE=$d/mnesia"
  echo "RABBITMQ_LOG_BASE=$d/log"
  echo "RABBITMQ_PID_FILE=$d/pid"
  echo "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
  echo "RABBITMQ_NODE_PORT=$(amqp_port "$n")"
  echo "RABBITMQ_DIST_PORT=$(dist_port "$n")"
  # Erlang distribution on loopback only, as the main broker has it.
  echo "ERL_EPMD_ADDRESS=127.0.0.1"
  echo "ERL_FLAGS=-kernel inet_dist_use_interface {127,0,0,1}"
}

# rabbitmqctl against node N (or any other CLI in the package: CTL=rabbitmq-queues).
ctl() {
  local n="$1"
  shift
  local env_vars=()
  mapfile -t env_vars < <(node_env "$n")
  as_node_user "${env_vars[@]}" "$RABBIT_BIN/${CTL:-rabbitmqctl}" -n "$(node_name "$n")" "$@"
}

# The pids of node N's Erlang VM, found by the node name in its environment: never the main
# broker's, whose environment names no llmq-c node.
node_pids() {
  local want pid
  want="RABBITMQ_NODENAME=$(node_name "$1")"
  for pid in $(pgrep -x beam.smp || true); do
    if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "$want"; then
      echo "$pid"
    fi
  done
}

# Writes node N's folder: config, plugins (none), env file. Nodes 2 and 3 find node 1 by
# classic peer discovery and join it when they first boot, so forming the cluster takes no
# stop_app/join_cluster round trips (each rabbitmqctl call costs seconds on a busy machine).
# The llmq user comes from definitions loaded at boot.
prepare_node() {
  local n="$1" d
  d="$(node_dir "$n")"
  mkdir -p "$d/mnesia" "$d/log"
  # The AMQP listener is RABBITMQ_NODE_IP_ADDRESS and RABBITMQ_NODE_PORT (node_env).
  cat >"$d/rabbitmq.conf" <<EOF
log.file.level = info
log.console = false
load_definitions = $DIR/definitions.json
EOF
  if [ "$n" != 1 ]; then
    # Tried every second until node 1 answers, since the three boot at once.
    cat >>"$d/rabbitmq.conf" <<EOF
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = $(node_name 1)
cluster_formation.discovery_retry_limit = $BOOT_TIMEOUT
cluster_formation.discovery_retry_interval = 1000
EOF
  fi
  echo '[].' >"$d/enabled_plugins"
  : >"$d/rabbitmq-env.conf"
}

# The worker republishes with the sender's user_id, hence the impersonator tag, as on the
# main broker (scripts/ensure-services.sh) and in compose (rabbitmq/definitions.json, whose
# password hash of "llmq" this is).
write_definitions() {
  cat >"$DIR/definitions.json" <<'EOF'
{
  "users": [
    {
      "name": "llmq",
      "password_hash": "ufONCV+1gqdD5LAAgMeyZ2+N0RFfRgjkCdURxB3eNvah1Pe0",
      "hashing_algorithm": "rabbit_password_hashing_sha256",
      "tags": ["administrator", "impersonator"],
      "limits": {}
    }
  ],
  "vhosts": [{"name": "/"}],
  "permissions": [
    {"user": "llmq", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
  ]
}
EOF
}

# Starts node N's VM in the background (it boots on its own; see wait_booted).
launch_node() {
  local n="$1" d
  d="$(node_dir "$n")"
  rm -f "$d/pid"
  local env_vars=()
  mapfile -t env_vars < <(node_env "$n")
  as_node_user "${env_vars[@]}" "$RABBIT_BIN/rabbitmq-server" -detached \
    >>"$d/log/startup.log" 2>&1
}

# Waits until node N accepts AMQP connections: its listener opens at the end of its boot,
# after it has joined (or rejoined) the cluster. A port check costs nothing, a rabbitmqctl
# call seconds.
wait_booted() {
  local n="$1" d
  d="$(node_dir "$n")"
  for _ in $(seq 1 $((BOOT_TIMEOUT * 5))); do
    answers "$(amqp_port "$n")" && return 0
    if [ -z "$(node_pids "$n")" ] && [ -s "$d/pid" ]; then
      break # it started and died
    fi
    sleep 0.2
  done
  log "node $n did not start within ${BOOT_TIMEOUT}s; its log:"
  tail -n 30 "$d/log/startup.log" "$d/log/$(node_name "$n").log" >&2 2>/dev/null || true
  return 1
}

# Waits until node N sees all three nodes running.
wait_clustered() {
  ctl "$1" -q await_online_nodes "${#NODES[@]}" --timeout "$BOOT_TIMEOUT" >/dev/null
}

# Node N runs (a VM of ours with its name) and accepts AMQP connections; a port some other
# program holds does not count.
node_up() {
  [ -n "$(node_pids "$1")" ] && answers "$(amqp_port "$1")"
}

all_up() {
  local n
  for n in "${NODES[@]}"; do
    node_up "$n" || return 1
  done
}

any_up() {
  local n
  for n in "${NODES[@]}"; do
    node_up "$n" && return 0
  done
  return 1
}

# The Erlang cookie the nodes share must exist before they boot: three VMs starting at once
# would each write a different one.
ensure_cookie() {
  local home=$HOME
  [ "$(id -u)" = 0 ] && home=/var/lib/rabbitmq
  [ -s "$home/.erlang.cookie" ] && return 0
  # shellcheck disable=SC2016 # $HOME is the node user's, expanded by its shell
  as_node_user sh -c 'umask 077; tr -dc A-Z </dev/urandom | head -c 20 >"$HOME/.erlang.cookie"; chmod 400 "$HOME/.erlang.cookie"'
}

print_urls() {
  local n
  for n in "${NODES[@]}"; do
    echo "node $n: $(url "$n")"
  done
}

cmd_urls() {
  local n out=()
  for n in "${NODES[@]}"; do
    out+=("$(url "$n")")
  done
  local IFS=,
  echo "${out[*]}"
}

cmd_status() {
  local n ok=0 state
  for n in "${NODES[@]}"; do
    if node_up "$n"; then
      state=up
    else
      state=down
      ok=1
    fi
    echo "node $n $(node_name "$n") $(url "$n") $state"
  done
  return "$ok"
}

fresh_start() {
  local n
  # Left over from a cluster that is gone (a reboot, a killed run): start from nothing.
  stop_nodes
  rm -rf "$DIR"
  mkdir -p "$DIR"
  ensure_cookie
  write_definitions
  for n in "${NODES[@]}"; do
    prepare_node "$n"
  done
  if [ "$(id -u)" = 0 ]; then
    chown -R rabbitmq:rabbitmq "$DIR"
  fi
  # The three boot at once (the slow part); 2 and 3 wait for 1 and join it.
  for n in "${NODES[@]}"; do
    launch_node "$n" &
  done
  wait
  for n in "${NODES[@]}"; do
    wait_booted "$n"
  done
  wait_clustered 1
}

# Whether every node has its data folder.
all_have_data() {
  local n
  for n in "${NODES[@]}"; do
    [ -d "$(node_dir "$n")/mnesia" ] || return 1
  done
}

cmd_start() {
  local n started
  started=$(date +%s)
  if all_up; then
    log "already running"
  elif any_up && all_have_data; then
    # Part of it runs (a node-loss test failed before restoring it): bring the rest back.
    for n in "${NODES[@]}"; do
      node_up "$n" || cmd_restart "$n"
    done
  else
    # Nothing runs, or a stray node runs without the folders of the rest (another run
    # stopped the cluster under it): start afresh, stray nodes stopped first.
    log "starting three nodes under $DIR"
    fresh_start
    log "up in $(($(date +%s) - started))s"
  fi
  print_urls
}

# Stops every node of ours that runs: SIGTERM (a clean shutdown), then SIGKILL after a bound.
stop_nodes() {
  local pids=() n p
  for n in "${NODES[@]}"; do
    mapfile -t -O "${#pids[@]}" pids < <(node_pids "$n")
  done
  [ "${#pids[@]}" = 0 ] && return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 300); do
    local alive=0
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  log "nodes still running after 30s: SIGKILL"
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

cmd_stop() {
  stop_nodes
  rm -rf "$DIR"
  log "stopped, $DIR removed"
}

cmd_kill() {
  local n="$1" pids=() p
  check_node_number "$n"
  mapfile -t pids < <(node_pids "$n")
  [ "${#pids[@]}" = 0 ] && die "node $n ($(node_name "$n")) is not running"
  kill -KILL "${pids[@]}"
  for _ in $(seq 1 100); do
    local alive=0
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && { log "node $n killed (pid ${pids[*]})"; return 0; }
    sleep 0.1
  done
  die "node $n still runs 10s after SIGKILL"
}

cmd_shutdown() {
  local n="$1"
  check_node_number "$n"
  [ -n "$(node_pids "$n")" ] || die "node $n ($(node_name "$n")) is not running"
  # `shutdown` returns once the node's VM has exited, its queues handed over first.
  ctl "$n" -q shutdown >/dev/null || die "node $n did not shut down"
  log "node $n shut down"
}

cmd_restart() {
  local n="$1"
  check_node_number "$n"
  [ -d "$(node_dir "$n")/mnesia" ] || die "node $n has no data under $DIR: run 'scripts/cluster.sh start'"
  if [ -z "$(node_pids "$n")" ]; then
    launch_node "$n"
  fi
  wait_booted "$n"
  wait_clustered "$n"
  log "node $n is back in the cluster"
}

# The node number of quorum queue Q's leader, asked of the first node that answers; empty
# while it has none (an election under way).
cmd_leader() {
  local q="$1" n out
  for n in "${NODES[@]}"; do
    node_up "$n" || continue
    if out="$(ctl "$n" -q list_queues name leader --no-table-headers 2>/dev/null)"; then
      local leader
      leader="$(awk -F'\t' -v q="$q" '$1 == q { print $2 }' <<<"$out")"
      case "$leader" in
        llmq-c[123]@*) leader="${leader#llmq-c}"; echo "${leader%%@*}" ;;
      esac
      return 0
    fi
  done
  die "no node answers"
}

cmd_with() {
  [ "$#" -gt 0 ] || die "usage: $0 with COMMAND..."
  # Ours to stop only when no node ran: a cluster started by hand, even with a node down
  # (which the start below brings back), stays up.
  local mine=0
  any_up || mine=1
  # Stopped whatever the command's outcome, interrupted (during the start too) included.
  # shellcheck disable=SC2064
  trap "[ $mine = 1 ] && cmd_stop" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  cmd_start >/dev/null
  LLMQ_TEST_CLUSTER_URLS="$(cmd_urls)" "$@"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  urls) cmd_urls ;;
  kill) cmd_kill "${2:-}" ;;
  shutdown) cmd_shutdown "${2:-}" ;;
  restart) cmd_restart "${2:-}" ;;
  leader) [ -n "${2:-}" ] || die "usage: $0 leader QUEUE"; cmd_leader "$2" ;;
  ctl) check_node_number "${2:-}"; n="$2"; shift 2; ctl "$n" "$@" ;;
  with) shift; cmd_with "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 64 ;;
esac
