#!/usr/bin/env bash
# Relative paths given to the scripts are the caller's, although the scripts cd to the
# repository: scripts/lib/common.sh's sl_abs_path and SL_STATE_DIR, and --output, --build-dir
# and --server of scripts/bench and scripts/bench-instructions. Nothing is built, started or
# measured: each run stops at a check that names the path it resolved (--no-build, and never a
# complete pair of binaries).
# Usage: paths_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The caller's directory: somewhere that is not the repository.
mkdir -p "$tmp/caller/out" "$tmp/caller/build/client"
cd "$tmp/caller"

# --- scripts/lib/common.sh ---------------------------------------------------------------------
# shellcheck disable=SC2016 # expanded by the inner shell
got=$(SL_STATE_DIR=state bash -c '
  source "$1/scripts/lib/common.sh"
  cd "$SL_REPO_ROOT"
  printf "%s\n" "$(sl_abs_path rel/file)" "$(sl_abs_path /abs/file)" "$SL_STATE_DIR" \
    "$(sl_output_file out/table.md)"' _ "$repo_root") || fail "common.sh: $got"
want=$(printf '%s\n' "$tmp/caller/rel/file" /abs/file "$tmp/caller/state" \
  "$tmp/caller/out/table.md")
[[ $got == "$want" ]] || fail "common.sh resolved against the wrong directory: got
$got
want
$want"

for script in bench bench-instructions; do
  bin=$repo_root/scripts/$script
  # A relative --output in a directory the caller has (and the repository has not) is accepted;
  # the run then stops at the missing build, named under the caller's directory.
  run_capturing_stderr "$bin" --no-build --build-dir no-such-build --output out/table.md
  ((rc == 1)) || fail "$script --no-build with a missing build: exit $rc, want 1: $err"
  [[ $err == *"missing $tmp/caller/no-such-build/"* ]] ||
    fail "$script did not look for --build-dir no-such-build in the caller's directory: $err"
  # An --output that cannot be written is refused before anything runs, by its full path.
  run_capturing_stderr "$bin" --no-build --build-dir no-such-build --output no-such-dir/table.md
  ((rc == 2)) || fail "$script --output into a missing directory: exit $rc, want 2: $err"
  [[ $err == *"cannot write $tmp/caller/no-such-dir/table.md"* ]] ||
    fail "$script did not name the --output path in the caller's directory: $err"
done

# bench-instructions --server: the CLI is there (a stub), the relative server is not.
printf '#!/bin/sh\nexit 1\n' >build/client/sessionledger-cli
chmod +x build/client/sessionledger-cli
run_capturing_stderr "$repo_root/scripts/bench-instructions" --no-build --build-dir build --server srv
((rc == 1)) || fail "bench-instructions with a missing --server: exit $rc, want 1: $err"
[[ $err == *"missing $tmp/caller/srv"* ]] ||
  fail "bench-instructions did not look for --server srv in the caller's directory: $err"
echo "paths_test: ok"
