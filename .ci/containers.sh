#!/usr/bin/env bash
# Runs the tests that need a Docker engine, in one of this run's own, and
# stops and removes it afterwards. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
log() { echo "== $*"; }

# testcontainers-go for real: a Docker engine of this run's own (no
# bridge, no iptables: containers run on the host's network), a PostgreSQL
# image built from this machine's own PostgreSQL (no registry is reachable),
# the container module's tests, and jobwatchtest's against a server that
# wants a password. Stopped and removed at the end.
log "testcontainers-go: a Docker engine of this run's own"
if ! command -v dockerd >/dev/null 2>&1; then
	log "Docker is not installed: installing docker.io with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq docker.io >/dev/null
fi
docker_dir=$(mktemp -d /tmp/jobwatch-ci-docker.XXXXXX)
dockerd --iptables=false --ip6tables=false --bridge=none --ip-forward=false --ip-masq=false \
	--storage-driver=overlay2 --data-root="$docker_dir/root" --exec-root="$docker_dir/exec" \
	--pidfile="$docker_dir/pid" -H "unix://$docker_dir/docker.sock" >"$docker_dir/log" 2>&1 &
dockerd_pid=$!
stop_docker() {
	if [ -n "${pg_container:-}" ]; then docker rm -f "$pg_container" >/dev/null 2>&1 || true; fi
	kill "$dockerd_pid" 2>/dev/null || true
	wait "$dockerd_pid" 2>/dev/null || true
	# dockerd leaves its network namespace mounted.
	awk -v d="$docker_dir" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount 2>/dev/null || true
	rm -rf "$docker_dir"
}
trap stop_docker EXIT
export DOCKER_HOST="unix://$docker_dir/docker.sock"
for _ in $(seq 1 100); do
	docker info >/dev/null 2>&1 && break
	sleep 0.1
done
if ! docker info >/dev/null 2>&1; then
	cat "$docker_dir/log" >&2
	echo "dockerd did not start" >&2
	exit 1
fi
image=jobwatch-postgres:ci
.ci/postgres-image.sh "$image" >/dev/null
log "tests of the container module, a container per run"
(
	cd jobwatchtest/container
	export TESTCONTAINERS_RYUK_DISABLED=true JOBWATCHTEST_IMAGE="$image" JOBWATCHTEST_NETWORK=host JOBWATCHTEST_SOURCE=container
	go test -race -count=1 ./...
)
log "jobwatchtest against a server that wants a password"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pg_container=$(docker run -d --network host -e POSTGRES_PASSWORD=ci-secret "$image" -c port="$port" -c listen_addresses=127.0.0.1)
for _ in $(seq 1 100); do
	PGPASSWORD=ci-secret psql -w -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atc 'SELECT 1' >/dev/null 2>&1 && break
	sleep 0.1
done
TEST_DATABASE_URL="postgres://postgres:ci-secret@127.0.0.1:$port/postgres" JOBWATCHTEST_SOURCE=url go test -race -count=1 ./jobwatchtest/
stop_docker
trap - EXIT
if ip link show 2>/dev/null | grep -q 'br-'; then
	echo "a bridge network was left behind" >&2
	exit 1
fi

