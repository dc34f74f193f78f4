#!/usr/bin/env bash
# scripts/test --sanitize and --tsan hand the sanitizers the repository's suppression files in a
# form their option parser reads, from a checkout whose path holds a single quote, or a double
# quote, besides spaces, commas and colons (the parser splits at those unless quoted, and has
# no escapes); a path holding both quotes is refused before anything runs. The options ctest
# would get are given to tiny ASan and TSan programs, which must find the files through them.
# Stubs in place of ctest, cmake, dpkg-query and backing-services: nothing is built or started.
# Usage: sanitizer_options_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin"

cat >"$tmp/leak.c" <<'C'
#include <stdlib.h>
void *leaked_on_purpose(void) { return malloc(64); }
int main(void) {
  void *volatile kept = leaked_on_purpose();
  kept = 0;
  return kept != 0;
}
C
printf 'int main(void) { return 0; }\n' >"$tmp/empty.c"
gcc -g -O0 -fsanitize=address "$tmp/leak.c" -o "$tmp/leak"
gcc -fsanitize=thread "$tmp/empty.c" -o "$tmp/tsan-empty"
# The controls. Unsuppressed, LeakSanitizer reports the leak, by name (or this test could not
# fail); a sanitizer that cannot run here at all is named as such, not as a quoting fault.
if out=$(LSAN_OPTIONS='' ASAN_OPTIONS='' "$tmp/leak" 2>&1); then
  fail "the leak is not reported without suppressions: the checks below would prove nothing"
fi
expect_in "$out" "LeakSanitizer's report without suppressions" "leaked_on_purpose"
out=$(TSAN_OPTIONS='' "$tmp/tsan-empty" 2>&1) ||
  fail "a ThreadSanitizer program does not run here even without options: $out"

# ctest records the options it was given; the rest succeed at once.
cat >"$tmp/bin/ctest" <<STUB
#!/usr/bin/env bash
printf '%s\n' "\${LSAN_OPTIONS-}" >"$tmp/lsan-options"
printf '%s\n' "\${TSAN_OPTIONS-}" >"$tmp/tsan-options"
STUB
printf '#!/bin/sh\nprintf "install ok installed"\n' >"$tmp/bin/dpkg-query"
printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/cmake"
chmod +x "$tmp/bin/"*
export PATH=$tmp/bin:$PATH
unset LSAN_OPTIONS TSAN_OPTIONS

# checkout_at DIR: a copy of scripts/ under DIR, with a stub backing-services and server, and
# suppression files that name what the programs above need.
checkout_at() {
  checkout=$1
  mkdir -p "$checkout/tests" "$checkout/build-asan/server" "$checkout/build-tsan/server"
  cp -R "$repo_root/scripts" "$checkout/scripts"
  cat >"$checkout/scripts/backing-services" <<'STUB'
#!/usr/bin/env bash
case $1 in
  status) exit 1 ;;
  start | stop) exit 0 ;;
  env) echo 'export SL_MEMCACHED_PORT_1=1' ;;
  *) exit 1 ;;
esac
STUB
  printf '#!/bin/sh\nexit 0\n' >"$checkout/build-asan/server/sessionledger-server"
  cp "$checkout/build-asan/server/sessionledger-server" "$checkout/build-tsan/server/"
  chmod +x "$checkout/scripts/backing-services" "$checkout/build-"*/server/sessionledger-server
  echo 'leak:leaked_on_purpose' >"$checkout/tests/lsan.supp"
  echo 'race_top:no_such_function_here' >"$checkout/tests/tsan.supp"
}

for name in "it's, a:checkout" 'a "quoted", checkout:here'; do
  checkout_at "$tmp/$name"
  export SL_STATE_DIR=$tmp/$name/state

  run_capturing_stderr "$checkout/scripts/test" --sanitize
  ((rc == 0)) || fail "scripts/test --sanitize in $checkout: exit $rc: $err"
  lsan_options=$(<"$tmp/lsan-options")
  out=$(LSAN_OPTIONS=$lsan_options "$tmp/leak" 2>&1) ||
    fail "LSAN_OPTIONS=$lsan_options did not suppress the leak through $checkout/tests/lsan.supp: $out"
  expect_in "$out" "LeakSanitizer's report" "leaked_on_purpose"

  run_capturing_stderr "$checkout/scripts/test" --tsan
  ((rc == 0)) || fail "scripts/test --tsan in $checkout: exit $rc: $err"
  tsan_options=$(<"$tmp/tsan-options")
  [[ $tsan_options == *halt_on_error=1* ]] || fail "TSAN_OPTIONS lost halt_on_error: $tsan_options"
  out=$(TSAN_OPTIONS=$tsan_options "$tmp/tsan-empty" 2>&1) ||
    fail "TSAN_OPTIONS=$tsan_options did not read $checkout/tests/tsan.supp: $out"
  # The same options without the file: TSan must miss it, so they did name it.
  mv "$checkout/tests/tsan.supp" "$checkout/tests/tsan.supp.away"
  if TSAN_OPTIONS=$tsan_options "$tmp/tsan-empty" 2>/dev/null; then
    fail "TSAN_OPTIONS=$tsan_options did not name $checkout/tests/tsan.supp"
  fi
done

both="it's \"both\""
checkout_at "$tmp/$both"
export SL_STATE_DIR=$tmp/$both/state
rm -f "$tmp/lsan-options"
run_capturing_stderr "$checkout/scripts/test" --sanitize
((rc == 1)) || fail "scripts/test --sanitize under a path with both quotes: exit $rc, want 1: $err"
expect_in "$err" "scripts/test's error" "cannot pass $checkout/tests/lsan.supp to the sanitizers"
[[ ! -e $tmp/lsan-options ]] || fail "ctest ran although the suppressions could not be passed"
echo "sanitizer_options_test: ok"
