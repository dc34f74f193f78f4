# shellcheck shell=bash
# Helpers shared by the tests of scripts/ in this directory. Source it; it runs nothing.

fail() {
  printf '%s: FAIL %s\n' "${0##*/}" "$*" >&2
  exit 1
}

# True if something accepts TCP connections on 127.0.0.1:PORT.
port_listening() {
  # shellcheck disable=SC2016 # expanded by the inner shell
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# free_port_block N: prints a port P such that nothing listens on P..P+N-1. Below 32768, the
# start of Linux's ephemeral range, so that no outgoing connection takes one of them meanwhile.
free_port_block() {
  local n=$1 base port tries
  for ((tries = 0; tries < 100; tries++)); do
    base=$((10000 + RANDOM % 20000))
    for ((port = base; port < base + n; port++)); do
      if port_listening "$port"; then
        continue 2
      fi
    done
    echo "$base"
    return 0
  done
  return 1
}
