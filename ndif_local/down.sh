#!/usr/bin/env bash
# Stop the local NDIF server that up.sh started: every process in each session it recorded (Ray's workers
# and actors included), by session id, TERM then KILL. Touches no other process. Safe to run twice.
set -uo pipefail
source "$(dirname "$0")/env.sh"

start_time() {  # clock ticks after boot at which pid $1 started (field 22 of /proc/PID/stat), or nothing
    [ -r "/proc/$1/stat" ] && sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f20
}

members() {  # pids whose session id is $1
    ps -e -o pid=,sid= | awk -v sid="$1" '$2 == sid { print $1 }'
}

sids=()
for name in api ray s3 redis; do  # the reverse of the start order
    pidfile="$NDIF_LOCAL_STATE/$name.pid"
    [ -e "$pidfile" ] || continue
    read -r sid started < "$pidfile"
    [[ "$sid" =~ ^[0-9]+$ ]] || continue
    # A live leader whose start time differs is another process that reused the pid: not ours.
    now="$(start_time "$sid")"
    [ -n "$now" ] && [ "$now" != "$started" ] && continue
    sids+=("$sid")
    pids=$(members "$sid")
    [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
done
for _ in $(seq 40); do
    left=""
    for sid in "${sids[@]}"; do left+=$(members "$sid"); done
    [ -z "$left" ] && break
    sleep 0.25
done
for sid in "${sids[@]}"; do
    pids=$(members "$sid")
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
done
rm -f "$NDIF_LOCAL_STATE"/*.pid
if [ -f "$NDIF_LOCAL_STATE/ray_tmp" ]; then
    ray_tmp="$(cat "$NDIF_LOCAL_STATE/ray_tmp")"
    [[ "$ray_tmp" == /tmp/lp-ndif.* ]] && rm -rf "$ray_tmp"
    rm -f "$NDIF_LOCAL_STATE/ray_tmp"
fi
exit 0
