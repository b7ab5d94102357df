#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development and tests:
#   cluster/local_cluster.sh start [N_WORKERS]   head + N worker nodes (separate temp dirs)
#   cluster/local_cluster.sh stop
# Then: RAY_ADDRESS=127.0.0.1:6380 t2i ...   (token auth stays on; the dashboard binds 127.0.0.1)
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_HEAD_PORT:-6380}
BASE=${RAY_CLUSTER_DIR:-/tmp/t2i-cluster}
CPUS=${RAY_NODE_CPUS:-2}

# Token authentication stays on: every node and client presents ~/.ray/auth_token.
export RAY_AUTH_MODE=token

case "${1:-}" in
  start)
    workers=${2:-1}
    mkdir -p "$BASE"
    "$RAY" get-auth-token --generate >/dev/null
    "$RAY" start --head --port "$PORT" --num-cpus "$CPUS" --temp-dir "$BASE/head" \
      --dashboard-host 127.0.0.1 --disable-usage-stats
    for i in $(seq 1 "$workers"); do
      "$RAY" start --address "127.0.0.1:$PORT" --num-cpus "$CPUS" --temp-dir "$BASE/worker$i" \
        --disable-usage-stats
    done
    echo "cluster up: RAY_ADDRESS=127.0.0.1:$PORT (head + $workers worker node(s))"
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start [N_WORKERS] | stop" >&2
    exit 2
    ;;
esac
