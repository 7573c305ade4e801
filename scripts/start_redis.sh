#!/usr/bin/env bash
# Start a local Redis for kvserve's Redis KV tier (idempotent).
#
#   scripts/start_redis.sh [PORT] [MAXMEMORY]      defaults: 6379 1gb
#
# Installs the Debian package `redis-server` if the binary is missing (needs
# root or sudo), then starts redis-server daemonized on 127.0.0.1:PORT unless
# something there already answers PING.  The server runs as a cache: no
# persistence, `maxmemory` MAXMEMORY with `allkeys-lru` eviction (the Redis
# tier relies on the server for its size bound).  Logs and pid file go to
# ${KVSERVE_REDIS_DIR:-/tmp}/kvserve-redis-PORT.{log,pid}.
set -euo pipefail

PORT="${1:-6379}"
MAXMEMORY="${2:-1gb}"
DIR="${KVSERVE_REDIS_DIR:-/tmp}"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "start_redis: redis-server not found; installing the Debian package" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "start_redis: need root or sudo to apt-get install redis-server" >&2; exit 1
        fi
    fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server
fi

ping() { redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; }

if ping; then
    echo "start_redis: redis already running on 127.0.0.1:$PORT"
    exit 0
fi

mkdir -p "$DIR"
redis-server \
    --bind 127.0.0.1 --port "$PORT" \
    --daemonize yes \
    --pidfile "$DIR/kvserve-redis-$PORT.pid" \
    --logfile "$DIR/kvserve-redis-$PORT.log" \
    --dir "$DIR" \
    --save "" --appendonly no \
    --maxmemory "$MAXMEMORY" --maxmemory-policy allkeys-lru

for _ in $(seq 1 50); do
    if ping; then
        echo "start_redis: redis started on 127.0.0.1:$PORT (maxmemory $MAXMEMORY, log $DIR/kvserve-redis-$PORT.log)"
        exit 0
    fi
    sleep 0.1
done
echo "start_redis: redis did not answer on port $PORT; see $DIR/kvserve-redis-$PORT.log" >&2
exit 1
