#!/usr/bin/env bash
# check_manifests.py must refuse what it is there to catch, not only pass the real manifests.
# Each case runs it on a scratch copy of deploy/k8s (and of server/config/config.cc, where it
# reads the server's defaults) with one thing changed, and expects the failure that names it.
# Usage: tests/deploy/check_manifests_test.sh [REPO_ROOT [PYTHON3]]. Exit 0 when all pass.
set -euo pipefail

root=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
python=${2:-python3}
checker=$root/tests/deploy/check_manifests.py
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failures=0

fresh_copy() {
  rm -rf "$scratch/deploy" "$scratch/server"
  mkdir -p "$scratch/deploy" "$scratch/server/config"
  cp -r "$root/deploy/k8s" "$scratch/deploy/"
  cp "$root/server/config/config.cc" "$scratch/server/config/"
}

# expect_failure WHAT PATTERN: the checker exits 1 on the scratch copy with a line matching
# PATTERN.
expect_failure() {
  local output status=0
  output=$("$python" "$checker" --root "$scratch" 2>&1) || status=$?
  if [[ $status -ne 1 ]] || ! grep -q -- "$2" <<<"$output"; then
    printf 'check_manifests_test: FAIL %s: expected exit 1 and a line matching %q, got exit %s:\n%s\n' \
      "$1" "$2" "$status" "$output" >&2
    failures=$((failures + 1))
  fi
}

# The unchanged copy passes, so each failure below is the change's.
fresh_copy
if ! output=$("$python" "$checker" --root "$scratch" 2>&1); then
  printf 'check_manifests_test: FAIL the unchanged copy does not pass:\n%s\n' "$output" >&2
  exit 1
fi

# A call runs on to its own deadline after the grace ends: with the base's preStop 5 s, notice
# 1 s and grace 20 s, a 30 s call timeout needs 5 + 1 + 20 + (30 - 20) = 36 s > 35.
fresh_copy
echo "DEFAULT_CALL_TIMEOUT_MS=30000" >>"$scratch/deploy/k8s/config.env"
expect_failure "a call timeout beyond the grace" "DEFAULT_CALL_TIMEOUT_MS 30000 ms"

# ... and one that ends within the grace adds nothing.
fresh_copy
echo "DEFAULT_CALL_TIMEOUT_MS=20000" >>"$scratch/deploy/k8s/config.env"
if ! output=$("$python" "$checker" --root "$scratch" 2>&1); then
  printf 'check_manifests_test: FAIL a call timeout within the grace was refused:\n%s\n' \
    "$output" >&2
  failures=$((failures + 1))
fi

# The grace alone: 5 + 1 + 30 = 36 s > 35.
fresh_copy
sed -i 's/^SHUTDOWN_GRACE_SECONDS=.*/SHUTDOWN_GRACE_SECONDS=30/' "$scratch/deploy/k8s/config.env"
expect_failure "a grace beyond terminationGracePeriodSeconds" "SHUTDOWN_GRACE_SECONDS 30"

if ((failures > 0)); then
  echo "check_manifests_test: $failures case(s) failed" >&2
  exit 1
fi
echo "check_manifests_test: OK"
