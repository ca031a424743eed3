#!/usr/bin/env bash
# Starts a local 3-node NATS JetStream cluster on loopback, for trying
# cluster mode and for the tests (issue 19: cluster mode on JetStream).
#
#   examples/cluster/nats-cluster.sh up DIR [BASE_PORT]   # nodes on BASE_PORT, +1, +2 (default 14222)
#   examples/cluster/nats-cluster.sh gateways DIR N [FIRST_PORT]   # N gateways on FIRST_PORT.. (default 50051)
#   examples/cluster/nats-cluster.sh down DIR             # stops the gateways and the nodes
#
# Each node keeps its JetStream files under DIR/nN, logs to DIR/nN.log and
# its pid in DIR/nN.pid. Needs `nats-server` (Debian: apt-get install
# nats-server; 2.9 or later). `up` prints the client URLs
# (nats://127.0.0.1:BASE_PORT,...). `gateways` starts `pullstream serve
# --engine jetstream` N times on the cluster `up` started (the binary is
# $PULLSTREAM, or `pullstream` on PATH), logs to DIR/gN.log, and prints
# each gateway's URL.
set -euo pipefail

command=${1:?usage: $0 up|down DIR [BASE_PORT]}
dir=${2:?usage: $0 up|down DIR [BASE_PORT]}
base=${3:-14222}

case "$command" in
up)
    command -v nats-server >/dev/null || {
        echo "nats-server not found: apt-get install nats-server (2.9 or later)" >&2
        exit 1
    }
    mkdir -p "$dir"
    routes=""
    for i in 0 1 2; do
        routes="$routes${routes:+, }nats-route://127.0.0.1:$((base + 100 + i))"
    done
    for i in 0 1 2; do
        node="n$i"
        cat >"$dir/$node.conf" <<CONF
server_name: $node
listen: 127.0.0.1:$((base + i))
# One appended group is one message: 8 MB lets Pullstream keep its
# default limits (1 MiB events, 4 MiB batches; half of this).
max_payload: 8MB
http: 127.0.0.1:$((base + 200 + i))
jetstream {
  store_dir: "$dir/$node"
  max_memory_store: 64MB
  max_file_store: 1GB
}
cluster {
  name: pullstream-dev
  listen: 127.0.0.1:$((base + 100 + i))
  routes: [ $routes ]
}
CONF
        nats-server -c "$dir/$node.conf" >"$dir/$node.log" 2>&1 &
        echo $! >"$dir/$node.pid"
    done
    # Ready once every node's monitoring endpoint says JetStream is up and
    # a meta leader is elected.
    for _ in $(seq 1 100); do
        ready=0
        for i in 0 1 2; do
            if curl -fsS "http://127.0.0.1:$((base + 200 + i))/healthz?js-enabled-only=true" >/dev/null 2>&1; then
                ready=$((ready + 1))
            fi
        done
        leader=$(curl -fsS "http://127.0.0.1:$((base + 200))/jsz" 2>/dev/null | grep -o '"leader": *"[^"]*"' || true)
        if [ "$ready" = 3 ] && [ -n "$leader" ]; then
            urls="nats://127.0.0.1:$base,nats://127.0.0.1:$((base + 1)),nats://127.0.0.1:$((base + 2))"
            echo "$urls" >"$dir/urls"
            echo "$urls"
            exit 0
        fi
        sleep 0.1
    done
    echo "the cluster did not become ready in 10 s; see $dir/n*.log" >&2
    exit 1
    ;;
gateways)
    count=${3:?usage: $0 gateways DIR N [FIRST_PORT]}
    first=${4:-50051}
    binary=${PULLSTREAM:-pullstream}
    command -v "$binary" >/dev/null || {
        echo "$binary not found: set PULLSTREAM=path/to/pullstream (cargo build --release: target/release/pullstream)" >&2
        exit 1
    }
    [ -e "$dir/urls" ] || {
        echo "no cluster in $dir: run $0 up $dir first" >&2
        exit 1
    }
    for i in $(seq 0 $((count - 1))); do
        port=$((first + i))
        "$binary" serve --engine jetstream --nats-url "$(cat "$dir/urls")" \
            --listen "127.0.0.1:$port" --data-dir "$dir/g$i" >"$dir/g$i.log" 2>&1 &
        echo $! >"$dir/g$i.pid"
    done
    for i in $(seq 0 $((count - 1))); do
        port=$((first + i))
        # Up to 40 s: a gateway asks a cluster that is still electing its
        # leaders again for up to 30 s.
        for _ in $(seq 1 400); do
            grep -q "serving gRPC" "$dir/g$i.log" 2>/dev/null && break
            if ! kill -0 "$(cat "$dir/g$i.pid")" 2>/dev/null; then
                echo "gateway $i exited; see $dir/g$i.log" >&2
                exit 1
            fi
            sleep 0.1
        done
        grep -q "serving gRPC" "$dir/g$i.log" || {
            echo "gateway $i did not start in 40 s; see $dir/g$i.log" >&2
            exit 1
        }
        echo "http://127.0.0.1:$port"
    done
    ;;
down)
    # The gateways first, waiting (10 s at most) for each to finish its
    # shutdown while the cluster is still there.
    for pid in "$dir"/g*.pid; do
        [ -e "$pid" ] || continue
        kill "$(cat "$pid")" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$(cat "$pid")" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$pid"
    done
    for pid in "$dir"/n*.pid; do
        [ -e "$pid" ] || continue
        kill "$(cat "$pid")" 2>/dev/null || true
        rm -f "$pid"
    done
    ;;
*)
    echo "usage: $0 up DIR [BASE_PORT] | gateways DIR N [FIRST_PORT] | down DIR" >&2
    exit 64
    ;;
esac
