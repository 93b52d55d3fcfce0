#!/usr/bin/env bash
# Make sure the services the tests need answer: Redis and PostgreSQL on 127.0.0.1 (or the hosts
# in TEST_REDIS_URL / TEST_DATABASE_URL). A service that is down is started when this machine
# can start it (a local redis-server, pg_ctlcluster, or `docker compose up -d`); otherwise this
# fails with a message naming the service. It never lets the tests skip silently.
set -uo pipefail

redis_host=${REDIS_HOST:-127.0.0.1} redis_port=${REDIS_PORT:-6379}
pg_host=${PG_HOST:-127.0.0.1} pg_port=${PG_PORT:-5432}

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {  # name host port
  for _ in $(seq 1 60); do answers "$2" "$3" && return 0; sleep 0.5; done
  return 1
}

compose_up() {  # service
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    docker compose up -d "$1" >/dev/null 2>&1 && return 0
  fi
  return 1
}

if ! answers "$redis_host" "$redis_port"; then
  echo "Redis is not answering on $redis_host:$redis_port; starting it"
  if command -v redis-server >/dev/null; then
    mkdir -p /tmp/update-worker-redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$redis_port" --save "" \
      --appendonly no --dir /tmp/update-worker-redis --logfile /tmp/update-worker-redis/redis.log
  else
    compose_up redis
  fi
  wait_for Redis "$redis_host" "$redis_port" || {
    echo "ERROR: Redis is not reachable on $redis_host:$redis_port and could not be started" \
         "(install redis-server, or run Docker)." >&2
    exit 1
  }
fi

if ! answers "$pg_host" "$pg_port"; then
  echo "PostgreSQL is not answering on $pg_host:$pg_port; starting it"
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    for version in $(ls /etc/postgresql); do
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
  else
    compose_up postgres
  fi
  wait_for PostgreSQL "$pg_host" "$pg_port" || {
    echo "ERROR: PostgreSQL is not reachable on $pg_host:$pg_port and could not be started" \
         "(install postgresql, or run Docker)." >&2
    exit 1
  }
fi

# The compose-file test validates docker-compose.yml with Debian's docker-compose.
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing docker-compose (to validate docker-compose.yml)"
  { apt-get update -qq && apt-get install -y -qq docker-compose; } >/dev/null 2>&1 \
    || echo "warning: could not install docker-compose; the compose test will fail and say so" >&2
fi
echo "services: Redis on $redis_host:$redis_port and PostgreSQL on $pg_host:$pg_port answer"
