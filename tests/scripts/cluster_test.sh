#!/usr/bin/env bash
# scripts/cluster from a checkout whose path holds a space: start 2 replicas + nginx (and the
# backing services, in the checkout's default state directory, <checkout>/.local), call Health
# through the balancer, stop it all. Before that, a start whose ports are held by somebody else
# must start nothing and say so. Own ports, own state directory: it shares nothing with the
# services scripts/test started.
# Usage: cluster_test.sh REPO_ROOT BUILD_DIR (BUILD_DIR holds server/sessionledger-server)
set -euo pipefail
repo_root=$1
build_dir=$2
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"
server=$build_dir/server/sessionledger-server
[[ -x $server ]] || fail "no server binary at $server"

tmp=$(mktemp -d /tmp/sessionledger-cluster-test.XXXXXX)
# As root the services run as memcache/postgres, who must reach the state directory: without
# this, backing-services would move its runtime files to a /tmp path without the space.
chmod 0755 "$tmp"
checkout="$tmp/a checkout"
mkdir -p "$checkout/deploy"
cp -R "$repo_root/scripts" "$checkout/scripts"
cp -R "$repo_root/deploy/nginx" "$checkout/deploy/nginx"
cluster=$checkout/scripts/cluster
# scripts/cluster's state directory there is the checkout's default, .local. For .ci/run, should
# ctest kill this test before its cleanup runs (test_lib.sh).
register_scratch "$repo_root" cluster "$checkout/.local" "$(cd "$build_dir" && pwd)"

base=$(free_port_block 6) || fail "found no 6 free ports in a row"
# scripts/test exports its own services' state directory and ports: not ours.
unset SL_STATE_DIR SL_CLUSTER_METRICS_BASE_PORT
export SL_MEMCACHED_PORT_1=$base SL_MEMCACHED_PORT_2=$((base + 1)) SL_POSTGRES_PORT=$((base + 2))
export SL_CLUSTER_LB_PORT=$((base + 3)) SL_CLUSTER_BASE_PORT=$((base + 4))
export SL_CLUSTER_BUILD_DIR=$build_dir

holders=()
cleanup() {
  local rc=$? stopped=1
  release_ports
  if ((rc != 0)); then
    for log in "$checkout"/.local/cluster/*.log "$checkout"/.local/cluster/nginx/error.log; do
      [[ -f $log ]] && { echo "--- $log"; tail -n 20 "$log"; } >&2
    done
  fi
  "$cluster" stop >/dev/null 2>&1 || stopped=0
  # A start that failed half-way may have left backing services that `cluster stop` does not
  # know it started.
  "$checkout/scripts/backing-services" stop >/dev/null 2>&1 || stopped=0
  finish_scratch "$stopped" "$tmp"
  ((stopped)) || rc=1
  exit "$rc"
}
trap cleanup EXIT

# --- Ports held by others: replica 2's and the balancer's -----------------------------------------
hold_port $((SL_CLUSTER_BASE_PORT + 1))
hold_port "$SL_CLUSTER_LB_PORT"
run_capturing_stderr "$cluster" start 2
((rc == 1)) || fail "start 2 with two of its ports taken: exit $rc, want 1: $err"
expect_in "$err" "the message" \
  "127.0.0.1:$((SL_CLUSTER_BASE_PORT + 1)) (SL_CLUSTER_BASE_PORT, for replica 2) is held by" \
  "127.0.0.1:$SL_CLUSTER_LB_PORT (SL_CLUSTER_LB_PORT, for nginx) is held by" \
  "not part of this checkout's cluster (state directory $checkout/.local)" \
  "nothing was started" "SL_STATE_DIR"
for port in "$SL_CLUSTER_BASE_PORT" "$SL_MEMCACHED_PORT_1" "$SL_POSTGRES_PORT"; do
  port_listening "$port" && fail "127.0.0.1:$port was started although the cluster could not be"
done
for pid in "${holders[@]}"; do
  kill -0 "$pid" 2>/dev/null || fail "a process holding a port (pid $pid) is gone"
done
release_ports

# --- A cluster in a path with a space ---------------------------------------------------------
"$cluster" start 2 >"$tmp/env" || fail "scripts/cluster start 2 failed in '$checkout'"
grep -qxF "export SL_CLUSTER_TARGET='127.0.0.1:$SL_CLUSTER_LB_PORT'" "$tmp/env" ||
  fail "start printed no SL_CLUSTER_TARGET: $(cat "$tmp/env")"
"$cluster" status || fail "status reports something down right after start"
# The replicas listen on 127.0.0.1 alone (LISTEN_ADDRESS): nothing listens on their ports on
# any other address, the wildcard least of all (/proc/net: `ss` may not be installed). gRPC may
# bind 127.0.0.1 on an IPv6 socket, as ::ffff:127.0.0.1.
for port in "$SL_CLUSTER_BASE_PORT" $((SL_CLUSTER_BASE_PORT + 1)); do
  others=$(awk -v port="$(printf ':%04X' "$port")" \
    '$4 == "0A" && substr($2, length($2) - 4) == port && $2 !~ /^(0000000000000000FFFF0000)?(0100007F|7F000001):/ {print $2}' \
    /proc/net/tcp /proc/net/tcp6)
  [[ -z $others ]] || fail "replica port $port listens beyond 127.0.0.1: $others"
  port_listening "$port" || fail "nothing listens on 127.0.0.1:$port"
done
nginx_dir="$checkout/.local/cluster/nginx"
[[ -s $nginx_dir/nginx.pid ]] || fail "nginx wrote no pid file in '$nginx_dir'"
PORT=$SL_CLUSTER_LB_PORT LISTEN_ADDRESS=127.0.0.1 "$server" healthcheck >/dev/null ||
  fail "Health through the balancer on 127.0.0.1:$SL_CLUSTER_LB_PORT failed"

"$cluster" stop || fail "scripts/cluster stop failed"
if "$cluster" status >/dev/null; then
  fail "status reports the cluster up after stop"
fi
if port_listening "$SL_CLUSTER_LB_PORT" || port_listening "$SL_MEMCACHED_PORT_1" ||
  port_listening "$SL_POSTGRES_PORT"; then
  fail "something still listens on the cluster's or the backing services' ports after stop"
fi
echo "cluster_test: ok"
