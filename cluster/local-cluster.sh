#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for trying the cluster path
# (`ray job submit`, several nodes, token auth) on a laptop or in CI.
#
#   cluster/local-cluster.sh up [N]      start a head node and N worker nodes (default 1)
#   cluster/local-cluster.sh status      `ray status` of the cluster
#   cluster/local-cluster.sh env         export lines for this cluster: eval "$(cluster/local-cluster.sh env)"
#   cluster/local-cluster.sh kill-node I SIGKILL worker node I (1..N) to simulate a node failure
#   cluster/local-cluster.sh down        stop every node this script started, delete its state
#
# What it does, and why:
#   * Each node is one `ray start --block` process in its own session
#     (setsid), with its own --temp-dir. `down` signals exactly those
#     process groups, recorded by pid in the state dir; it never runs
#     `ray stop`, which would kill every Ray process on the machine (your
#     other clusters, other users' tests).
#   * Token auth is on: a fresh random token is written to
#     $STATE_DIR/auth_token (mode 600) and every node and client reads it
#     through RAY_AUTH_TOKEN_PATH with RAY_AUTH_MODE=token. Your own
#     ~/.ray/auth_token is never read or written (`ray get-auth-token
#     --generate` would write there, so this script makes its own token).
#   * Nodes advertise 127.0.0.1 and the dashboard binds to 127.0.0.1.
#     Some Ray ports (GCS, raylet) still listen on all interfaces, which is
#     one more reason the token is on.
#   * Ports are fixed and away from Ray's defaults (6379/8265/10001/52365)
#     so this cluster can run next to a default local Ray.
#
# Settings (environment variables; defaults in brackets):
#   MASKMODEL_LOCAL_CLUSTER_DIR  state dir: token, pids, logs, Ray temp dirs
#                                [/tmp/maskmodel-local-cluster-$UID]; kept short
#                                because Ray's Unix socket paths live under it
#   MASKMODEL_RAY_PORT           GCS port of the head [6380]
#   MASKMODEL_DASHBOARD_PORT     dashboard / job API port [8266]
#   MASKMODEL_CLIENT_PORT        Ray Client server port [6381]
#   MASKMODEL_AGENT_PORT_BASE    dashboard agent HTTP port of node i is base+i [52400]
#   MASKMODEL_NODE_CPUS          logical CPUs per node [2]
#   MASKMODEL_HEAD_CPUS          logical CPUs of the head [MASKMODEL_NODE_CPUS]; 0 keeps
#                                tasks and actors off the head, as on the real clusters
#   MASKMODEL_NODE_GPUS          logical GPUs per worker node [0]; the head always gets 0
#   MASKMODEL_OBJECT_STORE_MB    object store per node, MiB [512]; N+1 nodes share this machine's RAM
#   MASKMODEL_STOP_TIMEOUT       seconds `down` waits for a node before SIGKILL [30]
#   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S  seconds a node drains before stopping [5]
#   MASKMODEL_LOCAL_CLUSTER_KEEP set to 1 to keep the state dir (logs) after `down`
#   RAY                          the ray CLI [.venv/bin/ray of this repo if present, else ray on PATH]

set -euo pipefail
set +m  # no job control: a background child must not be a group leader (see start_node)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"

STATE_DIR="${MASKMODEL_LOCAL_CLUSTER_DIR:-/tmp/maskmodel-local-cluster-$(id -u)}"
RAY_PORT="${MASKMODEL_RAY_PORT:-6380}"
DASHBOARD_PORT="${MASKMODEL_DASHBOARD_PORT:-8266}"
CLIENT_PORT="${MASKMODEL_CLIENT_PORT:-6381}"
AGENT_PORT_BASE="${MASKMODEL_AGENT_PORT_BASE:-52400}"
NODE_CPUS="${MASKMODEL_NODE_CPUS:-2}"
HEAD_CPUS="${MASKMODEL_HEAD_CPUS:-$NODE_CPUS}"
NODE_GPUS="${MASKMODEL_NODE_GPUS:-0}"
OBJECT_STORE_MB="${MASKMODEL_OBJECT_STORE_MB:-512}"
STOP_TIMEOUT="${MASKMODEL_STOP_TIMEOUT:-30}"
MARKER=".maskmodel-local-cluster"
HOST="127.0.0.1"

if [[ -n "${RAY:-}" ]]; then
  :
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
  RAY="$REPO_ROOT/.venv/bin/ray"
else
  RAY="$(command -v ray || true)"
fi
# How to spell that CLI in the hints we print: "ray" if it is the one on PATH.
RAY_CMD="${RAY:-ray}"
[[ -n "${RAY:-}" && "$(command -v ray 2>/dev/null)" == "$RAY" ]] && RAY_CMD=ray
# The Python that belongs to that ray CLI (used for setsid, port checks, the token).
PYTHON="$(dirname "${RAY:-/nonexistent}")/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3 || true)"

die() { echo "local-cluster: $*" >&2; exit 1; }

need_ray() {
  [[ -n "$RAY" && -x "$RAY" ]] || die "no 'ray' CLI found; run 'pip install .' in a virtualenv, or set RAY=/path/to/ray"
  local version
  version="$("$RAY" --version 2>/dev/null | awk '{print $NF}')"
  case "$version" in
    2.60.*) ;;
    *) echo "local-cluster: warning: ray $version found, this project pins ray 2.60.x (pyproject.toml)" >&2 ;;
  esac
}

# Client-side auth settings. RAY_AUTH_TOKEN would take precedence over
# RAY_AUTH_TOKEN_PATH, so it is removed from our environment.
use_cluster_auth() {
  unset RAY_AUTH_TOKEN
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"
}

# A node is `ray start --block` started as a session leader: its pid is the
# session id (and process group id) of everything it starts. Ray worker
# processes move to process groups of their own but stay in the session, so
# a node's processes are its group plus its session (where `ps` cannot show
# session ids, as on macOS, the group alone). Before signalling anything we
# check that one of them still names our state dir on its command line, so a
# recycled pid never leads us to another program.
node_members() {
  { ps -eo pid=,pgid=,sid= 2>/dev/null || ps -eo pid=,pgid=; } \
    | awk -v s="$1" '$2 == s || $3 == s {print $1}'
}
pid_alive() {  # is anything of node $1 left, and is it ours?
  local p
  for p in $(node_members "$1"); do
    ps -o args= -p "$p" 2>/dev/null | grep -qF -- "$STATE_DIR/" && return 0
  done
  return 1
}
signal_node() {  # $1 signal, $2 node pid: every process of that node
  local p
  pid_alive "$2" || return 0
  for p in $(node_members "$2"); do kill "-$1" "$p" 2>/dev/null || true; done
}

node_pids() {  # prints "name pid" for every recorded node, workers first, head last
  local f
  for f in "$STATE_DIR"/worker-*.pid; do
    [[ -e "$f" ]] && echo "$(basename "$f" .pid) $(cat "$f")"
  done
  [[ -e "$STATE_DIR/head.pid" ]] && echo "head $(cat "$STATE_DIR/head.pid")"
  return 0
}

any_alive() {
  local name pid
  while read -r name pid; do
    [[ -n "$pid" ]] && pid_alive "$pid" && return 0
  done < <(node_pids)
  return 1
}

check_port_free() {  # $1 port, $2 the variable that sets it
  "$PYTHON" - "$1" "$2" <<'PY' || exit 1
import socket, sys
port, var = int(sys.argv[1]), sys.argv[2]
for host in ("127.0.0.1", "0.0.0.0"):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do; TIME_WAIT is no conflict
    try:
        s.bind((host, port))
    except OSError:
        sys.exit(f"local-cluster: port {port} is in use; set {var} to a free port")
    finally:
        s.close()
PY
}

# start_node NAME LOGFILE ARGS... : `ray start --block ARGS` as the leader of
# a new session, so its pid is also the process group id of everything the
# node starts (GCS, raylet, dashboard, workers).
start_node() {
  local name="$1" log="$2"
  shift 2
  "$PYTHON" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \
    "$RAY" start --block "$@" </dev/null >"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$STATE_DIR/$name.pid"
  sleep 0.5
  [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]] \
    || die "$name (pid $pid) did not become a process group leader; see $log"
}

# wait_nodes N: until `ray status` lists N alive nodes (or a node dies).
wait_nodes() {
  local want="$1" deadline=$((SECONDS + 120)) have=0 name pid
  while ((SECONDS < deadline)); do
    while read -r name pid; do
      pid_alive "$pid" || die "$name exited during startup; see $STATE_DIR/$name.log, then run '$0 down'"
    done < <(node_pids)
    have="$("$RAY" status --address "$HOST:$RAY_PORT" 2>/dev/null \
      | awk '/^Active:/{a=1; next} /^Pending:/{a=0} a && /node_/{n++} END{print n+0}')" || have=0
    ((have >= want)) && return 0
    sleep 2
  done
  die "only $have of $want nodes joined within 120 s; see the logs in $STATE_DIR, then run '$0 down'"
}

cmd_up() {
  local workers="${1:-1}" i
  [[ "$workers" =~ ^[0-9]+$ ]] || die "usage: $0 up [N]   (N = number of worker nodes)"
  need_ray
  if [[ -d "$STATE_DIR" ]] && any_alive; then
    die "a cluster from this script is already running (state in $STATE_DIR); run '$0 down' first"
  fi
  if [[ -d "$STATE_DIR" && ! -e "$STATE_DIR/$MARKER" ]]; then
    die "$STATE_DIR exists and was not made by this script; set MASKMODEL_LOCAL_CLUSTER_DIR"
  fi
  rm -rf "$STATE_DIR"
  (umask 077 && mkdir -p "$STATE_DIR")
  touch "$STATE_DIR/$MARKER"

  for spec in "$RAY_PORT:MASKMODEL_RAY_PORT" "$DASHBOARD_PORT:MASKMODEL_DASHBOARD_PORT" \
              "$CLIENT_PORT:MASKMODEL_CLIENT_PORT"; do
    check_port_free "${spec%%:*}" "${spec#*:}"
  done
  for ((i = 0; i <= workers; i++)); do
    check_port_free "$((AGENT_PORT_BASE + i))" MASKMODEL_AGENT_PORT_BASE
  done

  # A fresh 256-bit token for this cluster, readable only by you.
  (umask 077 && "$PYTHON" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' \
    >"$STATE_DIR/auth_token")
  use_cluster_auth
  # Anonymous usage stats off unless you chose otherwise (offline-safe).
  export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
  # Job entrypoints (`python -m jobs.train ...`) run with the nodes' PATH:
  # put the ray CLI's own environment first so `python` is the one with Ray.
  PATH="$(dirname "$RAY"):$PATH"
  export PATH
  # Every Ray process of these nodes inherits this. Without it, code that
  # looks for "the local cluster" (ray.init(), Ray Train's state-API calls)
  # may find another Ray on this machine (/tmp/ray/ray_current_cluster, or
  # "multiple active Ray instances") and fail or talk to the wrong cluster.
  export RAY_ADDRESS="$HOST:$RAY_PORT"
  # On SIGTERM a node first drains (waits for its work to leave) for up to
  # this long; Ray's default is 30 s. Short here so `down` is quick.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"

  local object_store=$((OBJECT_STORE_MB * 1024 * 1024))
  echo "local-cluster: starting head node (logs: $STATE_DIR/head.log)"
  start_node head "$STATE_DIR/head.log" \
    --head --node-ip-address="$HOST" --port="$RAY_PORT" \
    --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT_BASE" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$object_store" \
    --temp-dir="$STATE_DIR/head"
  wait_nodes 1

  for ((i = 1; i <= workers; i++)); do
    echo "local-cluster: starting worker node $i (logs: $STATE_DIR/worker-$i.log)"
    start_node "worker-$i" "$STATE_DIR/worker-$i.log" \
      --address="$HOST:$RAY_PORT" --node-ip-address="$HOST" \
      --dashboard-agent-listen-port="$((AGENT_PORT_BASE + i))" \
      --num-cpus="$NODE_CPUS" --num-gpus="$NODE_GPUS" --object-store-memory="$object_store" \
      --temp-dir="$STATE_DIR/worker-$i" --labels="maskmodel.local/node=worker-$i"
  done
  wait_nodes $((workers + 1))

  cat <<EOF

Ray cluster is up: 1 head + $workers worker node(s) on this machine, token auth on.
  GCS address:       $HOST:$RAY_PORT
  Dashboard/job API: http://$HOST:$DASHBOARD_PORT
  Auth token file:   $STATE_DIR/auth_token

Submit a job from the repository root:
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token \\
    $RAY_CMD job submit --address http://$HOST:$DASHBOARD_PORT --working-dir . -- python -m jobs.train --help

Or set up this shell once:  eval "\$($0 env)"
Stop it:                    $0 down
EOF
}

cmd_env() {
  [[ -e "$STATE_DIR/auth_token" ]] || die "no cluster state in $STATE_DIR; run '$0 up' first"
  cat <<EOF
unset RAY_AUTH_TOKEN
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token
export RAY_ADDRESS=$HOST:$RAY_PORT
export RAY_API_SERVER_ADDRESS=http://$HOST:$DASHBOARD_PORT
EOF
}

cmd_status() {
  need_ray
  [[ -e "$STATE_DIR/auth_token" ]] || die "no cluster state in $STATE_DIR; run '$0 up' first"
  local name pid
  while read -r name pid; do
    if pid_alive "$pid"; then echo "$name: pid $pid, running"; else echo "$name: pid $pid, stopped"; fi
  done < <(node_pids)
  use_cluster_auth
  "$RAY" status --address "$HOST:$RAY_PORT"
}

cmd_kill_node() {
  local i="${1:-}"
  [[ "$i" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 kill-node I   (I = worker number, 1..N)"
  [[ -e "$STATE_DIR/worker-$i.pid" ]] || die "no worker node $i in $STATE_DIR"
  local pid
  pid="$(cat "$STATE_DIR/worker-$i.pid")"
  pid_alive "$pid" || die "worker node $i (pid $pid) is not running"
  signal_node KILL "$pid"
  echo "local-cluster: killed worker node $i (session $pid)"
}

stop_node() {  # $1 name, $2 pid
  local name="$1" pid="$2" deadline
  pid_alive "$pid" || return 0
  # SIGTERM to `ray start --block` alone (not its group): it drains the node,
  # then stops the node's processes itself. Signalling the whole group at
  # once kills the head's GCS under its own drain call, which then waits out
  # a 30 s timeout (seen with Ray 2.60).
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
  if pid_alive "$pid"; then
    echo "local-cluster: $name did not stop within ${STOP_TIMEOUT}s; sending SIGKILL to its processes" >&2
    signal_node KILL "$pid"
    sleep 1
  fi
  echo "local-cluster: stopped $name (session $pid)"
}

cmd_down() {
  if [[ ! -d "$STATE_DIR" ]]; then
    echo "local-cluster: nothing to stop ($STATE_DIR does not exist)"
    return 0
  fi
  [[ -e "$STATE_DIR/$MARKER" ]] || die "$STATE_DIR was not made by this script; not touching it"
  local name pid
  while read -r name pid; do
    stop_node "$name" "$pid"
  done < <(node_pids)
  if [[ "${MASKMODEL_LOCAL_CLUSTER_KEEP:-0}" == 1 ]]; then
    rm -f "$STATE_DIR"/*.pid
    echo "local-cluster: kept logs in $STATE_DIR"
  else
    rm -rf "$STATE_DIR"
  fi
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  kill-node) shift; cmd_kill_node "$@" ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
