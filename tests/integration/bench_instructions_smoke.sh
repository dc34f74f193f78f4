#!/usr/bin/env bash
# Runs scripts/bench-instructions on the test build for a few calls of two RPCs, so that the
# script keeps working, and checks what it printed: a GetSession (token digest, a memcached
# read, a larger answer, an access-log line) costs the server more instructions and more
# allocations than a Health check, and neither costs nothing.
# Usage: bench_instructions_smoke.sh REPO_ROOT BUILD_DIR
set -euo pipefail
repo_root=$1
build_dir=$2
table=$("$repo_root/scripts/bench-instructions" --no-build --build-dir "$build_dir" \
  --rpcs health,get-session --requests 100 --concurrency 4)
printf '%s\n' "$table"
python3 - "$table" <<'PY'
import sys
rows = {}
for line in sys.argv[1].splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 4 and cells[0] in ("health", "get-session"):
        rows[cells[0]] = (float(cells[1].replace(",", "")), float(cells[3]))
assert set(rows) == {"health", "get-session"}, f"rows missing from the table: {rows}"
(health_ir, health_allocs), (get_ir, get_allocs) = rows["health"], rows["get-session"]
assert 0 < health_ir < get_ir, f"instructions per call: health {health_ir}, get-session {get_ir}"
assert 0 < health_allocs < get_allocs, f"allocations per call: health {health_allocs}, get-session {get_allocs}"
print("ok")
PY
