# The local NDIF server's settings, sourced by up.sh, down.sh and the tests' fixture (which read the same
# variables). Every port is on 127.0.0.1; override any of them, or NDIF_LOCAL_PORT_BASE, to move them all.
NDIF_LOCAL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NDIF_LOCAL_VENV="${NDIF_LOCAL_VENV:-$NDIF_LOCAL_ROOT/.venv-ndif}"
NDIF_LOCAL_STATE="${NDIF_LOCAL_STATE:-$NDIF_LOCAL_ROOT/.ndif}"
base="${NDIF_LOCAL_PORT_BASE:-18000}"
export NDIF_API_PORT="${NDIF_API_PORT:-$((base + 1))}"
NDIF_LOCAL_REDIS_PORT="${NDIF_LOCAL_REDIS_PORT:-$((base + 2))}"
NDIF_LOCAL_S3_PORT="${NDIF_LOCAL_S3_PORT:-$((base + 3))}"
NDIF_LOCAL_RAY_PORT="${NDIF_LOCAL_RAY_PORT:-$((base + 4))}"
NDIF_LOCAL_RAY_CLIENT_PORT="${NDIF_LOCAL_RAY_CLIENT_PORT:-$((base + 5))}"
NDIF_LOCAL_RAY_DASHBOARD_PORT="${NDIF_LOCAL_RAY_DASHBOARD_PORT:-$((base + 6))}"
# Further Ray ports: base+7 .. base+13 (node manager, object manager, agents, metrics), workers base+20..base+99.
NDIF_LOCAL_RAY_PORT_BASE="$base"
unset base

export NDIF_REDIS_URL="redis://127.0.0.1:$NDIF_LOCAL_REDIS_PORT"
export NDIF_OBJECT_STORE_URL="http://127.0.0.1:$NDIF_LOCAL_S3_PORT"
export NDIF_OBJECT_STORE_ACCESS_KEY="${NDIF_OBJECT_STORE_ACCESS_KEY:-ndif-local}"
export NDIF_OBJECT_STORE_SECRET_KEY="${NDIF_OBJECT_STORE_SECRET_KEY:-ndif-local}"
export NDIF_RAY_ADDRESS="ray://127.0.0.1:$NDIF_LOCAL_RAY_CLIENT_PORT"
export NDIF_DEFAULT_DTYPE="${NDIF_DEFAULT_DTYPE:-float32}"
export NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS="${NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS:-60}"
export NDIF_DEFAULT_MODEL_ACTOR_CLASS="ndif_cpu.actor.CPUModelActor"
export NDIF_CONTROLLER_IMPORT_PATH="ndif_cpu.controller.ControllerActor"
# Our adapters and nothing else of the repository: the server must not be able to import lens_plugins.
export PYTHONPATH="$NDIF_LOCAL_ROOT/ndif_local"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0
# Keeps Ray's services on --node-ip-address instead of the routable interface.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# As ndif's own ray/start.sh: the Ray client proxier's forked servers die at random with gRPC fork support on.
export GRPC_ENABLE_FORK_SUPPORT=0
