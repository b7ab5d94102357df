#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development and tests:
#   cluster/local_cluster.sh start [N_WORKERS]   head + N worker nodes (separate temp dirs)
#   cluster/local_cluster.sh add                 one more worker node (a replacement)
#   cluster/local_cluster.sh kill-node I         stop worker node I (its raylet and workers)
#   cluster/local_cluster.sh status              this cluster's nodes and their PIDs
#   cluster/local_cluster.sh stop                stop THIS cluster's nodes only
# Then: RAY_ADDRESS=127.0.0.1:6380 t2i ...        (token auth stays on)
#       t2i submit --address http://127.0.0.1:8266 -- train ...   (dashboard on 127.0.0.1)
#
# Each node is one `ray start --block` process whose PID is kept in $BASE/<node>.pid: stopping
# it stops that node's raylet, object store and workers, and nothing else. (`ray stop` would kill
# every Ray process of the user, including other clusters and local instances.)
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PY=${PY:-.venv/bin/python}
PORT=${RAY_HEAD_PORT:-6380}
DASH_PORT=${RAY_DASHBOARD_PORT:-8266}
BASE=${RAY_CLUSTER_DIR:-/tmp/t2i-cluster}
CPUS=${RAY_NODE_CPUS:-2}
WAIT_S=${RAY_NODE_WAIT_S:-120}

# Token authentication stays on: every node and client presents the token
# ($RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token).
export RAY_AUTH_MODE=token
# Processes on these nodes that look for "the" cluster (Ray Train's placement-group cleaner,
# drivers) find this one, even when other Ray instances run on the same machine.
export RAY_ADDRESS="127.0.0.1:$PORT"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Ports every node opens: fresh ones, so several nodes (and other Ray instances) share the host.
node_ports() {
  echo "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
       "--metrics-export-port=$(free_port) --runtime-env-agent-port=$(free_port)"
}

alive_nodes() {  # number of alive nodes the GCS knows
  "$PY" - "$PORT" <<'EOF' 2>/dev/null || echo 0
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="error", log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()))
EOF
}

start_node() {  # start_node NAME ARGS...: one `ray start --block` in the background
  local name=$1; shift
  mkdir -p "$BASE/$name"
  # shellcheck disable=SC2046
  nohup "$RAY" start --block --num-cpus "$CPUS" --temp-dir "$BASE/$name" \
    --disable-usage-stats $(node_ports) "$@" >"$BASE/$name.log" 2>&1 &
  echo $! >"$BASE/$name.pid"
}

wait_nodes() {  # wait_nodes N: until N nodes are alive, or fail naming the logs
  local want=$1 deadline=$((SECONDS + WAIT_S))
  until [ "$(alive_nodes)" -ge "$want" ]; do
    if [ $SECONDS -ge $deadline ]; then
      echo "local_cluster: $want node(s) not up after ${WAIT_S}s; see $BASE/*.log" >&2
      exit 1
    fi
    sleep 1
  done
}

stop_node() {  # stop_node NAME: SIGTERM its `ray start --block`, which stops the node
  local pidfile="$BASE/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
}

n_workers() { ls "$BASE"/worker*.pid 2>/dev/null | wc -l; }

case "${1:-}" in
  start)
    workers=${2:-1}
    if [ -f "$BASE/head.pid" ] && kill -0 "$(cat "$BASE/head.pid")" 2>/dev/null; then
      echo "local_cluster: already running ($BASE/head.pid); stop it first" >&2
      exit 1
    fi
    mkdir -p "$BASE"
    [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] || "$RAY" get-auth-token --generate >/dev/null
    start_node head --head --port "$PORT" --dashboard-host 127.0.0.1 \
      --dashboard-port "$DASH_PORT" --include-dashboard=true
    wait_nodes 1
    for i in $(seq 1 "$workers"); do
      start_node "worker$i" --address "127.0.0.1:$PORT"
    done
    wait_nodes $((workers + 1))
    echo "cluster up: RAY_ADDRESS=127.0.0.1:$PORT, jobs: http://127.0.0.1:$DASH_PORT" \
      "(head + $workers worker node(s), $CPUS CPUs each)"
    ;;
  add)
    i=$(( $(ls "$BASE" | sed -n 's/^worker\([0-9]*\)$/\1/p' | sort -n | tail -1) + 1 ))
    start_node "worker$i" --address "127.0.0.1:$PORT"
    wait_nodes $(($(n_workers) + 1))
    echo "added worker$i"
    ;;
  kill-node)
    stop_node "worker${2:?usage: $0 kill-node I}"
    echo "stopped worker$2"
    ;;
  status)
    for f in "$BASE"/*.pid; do
      [ -f "$f" ] || continue
      pid=$(cat "$f"); state=dead; kill -0 "$pid" 2>/dev/null && state=alive
      echo "$(basename "$f" .pid) pid=$pid $state"
    done
    ;;
  stop)
    for f in "$BASE"/worker*.pid; do [ -f "$f" ] && stop_node "$(basename "$f" .pid)"; done
    stop_node head
    echo "cluster stopped ($BASE)"
    ;;
  *)
    echo "usage: $0 start [N_WORKERS] | add | kill-node I | status | stop" >&2
    exit 2
    ;;
esac
