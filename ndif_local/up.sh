#!/usr/bin/env bash
# Start a local NDIF server (ndif 0.1.2 from .venv-ndif) on loopback ports, CPU only:
# redis, an S3 object store (moto), a Ray head with ndif's controller, and ndif's API (gunicorn).
# Each service runs in its own session whose id is written to $NDIF_LOCAL_STATE/*.pid; down.sh ends
# exactly those sessions. Prints the client's host (nnsight.CONFIG.API.HOST) when the API answers.
set -euo pipefail
source "$(dirname "$0")/env.sh"
PY="$NDIF_LOCAL_VENV/bin"
[ -x "$PY/ray" ] || { echo "ndif-up: $NDIF_LOCAL_VENV is missing; run 'make venv-ndif'" >&2; exit 1; }
if ls "$NDIF_LOCAL_STATE"/*.pid >/dev/null 2>&1; then
    echo "ndif-up: a local NDIF server is already recorded in $NDIF_LOCAL_STATE; run ndif_local/down.sh first" >&2
    exit 1
fi
mkdir -p "$NDIF_LOCAL_STATE"
# Ray's socket paths must stay short (107 bytes), so its temp dir lives under /tmp; down.sh removes it.
RAY_TMP="$(mktemp -d /tmp/lp-ndif.XXXXXX)"
echo "$RAY_TMP" > "$NDIF_LOCAL_STATE/ray_tmp"
# Server processes run from the state dir: Python puts a driver's working directory on its path (and Ray
# passes the driver's path on to its workers), and the repository root holds lens_plugins.
cd "$NDIF_LOCAL_STATE"

start() {  # start NAME CMD...: CMD as the leader of a new session (its pid is the session id)
    local name="$1"; shift
    setsid "$@" > "$NDIF_LOCAL_STATE/$name.log" 2>&1 < /dev/null &
    echo "$! $(sed 's/.*) //' "/proc/$!/stat" | cut -d' ' -f20)" > "$NDIF_LOCAL_STATE/$name.pid"
}

wait_port() {  # wait_port NAME PORT SECONDS
    local i
    for ((i = 0; i < $3 * 4; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        kill -0 "$(cut -d' ' -f1 "$NDIF_LOCAL_STATE/$1.pid")" 2>/dev/null || break
        sleep 0.25
    done
    echo "ndif-up: $1 did not listen on 127.0.0.1:$2; its log:" >&2
    tail -n 40 "$NDIF_LOCAL_STATE/$1.log" >&2
    return 1
}

fail() { "$(dirname "$0")/down.sh" >&2 || true; exit 1; }
trap fail ERR

start redis redis-server --bind 127.0.0.1 --port "$NDIF_LOCAL_REDIS_PORT" --save "" --appendonly no \
    --dir "$NDIF_LOCAL_STATE" --client-output-buffer-limit pubsub 32mb 8mb 60
start s3 "$PY/moto_server" -H 127.0.0.1 -p "$NDIF_LOCAL_S3_PORT"

b=$NDIF_LOCAL_RAY_PORT_BASE
# A fake GPU: ndif's controller manages only nodes that report one (the actor runs on CPU regardless).
start ray env -u RAY_ADDRESS "$PY/ray" start --head --block --node-ip-address=127.0.0.1 \
    --port="$NDIF_LOCAL_RAY_PORT" --ray-client-server-port="$NDIF_LOCAL_RAY_CLIENT_PORT" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$NDIF_LOCAL_RAY_DASHBOARD_PORT" \
    --node-manager-port=$((b + 7)) --object-manager-port=$((b + 8)) --dashboard-agent-grpc-port=$((b + 9)) \
    --dashboard-agent-listen-port=$((b + 10)) --metrics-export-port=$((b + 11)) \
    --runtime-env-agent-port=$((b + 12)) --min-worker-port=$((b + 20)) --max-worker-port=$((b + 99)) \
    --num-cpus=8 --num-gpus=1 --temp-dir="$RAY_TMP" --disable-usage-stats \
    --resources="{\"head\": 10, \"cuda_memory_bytes\": $((16 << 30)), \"cpu_memory_bytes\": $((16 << 30))}"

wait_port redis "$NDIF_LOCAL_REDIS_PORT" 20
wait_port s3 "$NDIF_LOCAL_S3_PORT" 60
wait_port ray "$NDIF_LOCAL_RAY_CLIENT_PORT" 120

# The controller's driver launches a detached actor (inside Ray's session) and exits.
RAY_ADDRESS="127.0.0.1:$NDIF_LOCAL_RAY_PORT" timeout 120 "$PY/python" \
    -m ndif.services.ray.deployments.controller.controller > "$NDIF_LOCAL_STATE/controller.log" 2>&1

start api "$PY/gunicorn" --config python:ndif_cpu.gunicorn_conf ndif.services.api.app:app
wait_port api "$NDIF_API_PORT" 120
for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$NDIF_API_PORT/ping" >/dev/null && break
    sleep 0.5
done
curl -sf "http://127.0.0.1:$NDIF_API_PORT/ping" >/dev/null
trap - ERR
echo "http://127.0.0.1:$NDIF_API_PORT"
