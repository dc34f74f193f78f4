# shellcheck shell=bash
# Steps shared by the scripts: installing the Debian packages the build, the tests and the
# backing services need, configuring/building with CMake, and reading paths the caller gave.
# Source this file before any `cd`; it defines functions, SL_REPO_ROOT and SL_CALLER_DIR, makes
# a relative SL_STATE_DIR absolute and appends /usr/sbin and /sbin to PATH if missing (see
# below), and runs nothing else.

SL_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
readonly SL_REPO_ROOT
# The directory the script was started from. Most scripts cd to SL_REPO_ROOT next, but a
# relative path a user types (--output out.md, SL_STATE_DIR=state) means one in their own
# directory, as it does for every other command.
SL_CALLER_DIR=$PWD
readonly SL_CALLER_DIR

# sl_abs_path PATH: PATH if absolute, else PATH under SL_CALLER_DIR. Only joins the two: PATH
# need not exist, and symbolic links are left alone.
sl_abs_path() {
  if [[ $1 == /* ]]; then
    printf '%s\n' "$1"
  else
    printf '%s\n' "$SL_CALLER_DIR/$1"
  fi
}

# sl_output_file PATH: PATH made absolute (sl_abs_path), once it is known that a file can be
# written there; otherwise says why and fails. For --output options: a benchmark finds out
# before it runs for minutes, not after.
sl_output_file() {
  local path dir
  path=$(sl_abs_path "$1")
  dir=$(dirname -- "$path")
  if [[ -d $path ]]; then
    sl_log "cannot write $path: it is a directory"
    return 1
  fi
  if [[ ! -d $dir || ! -w $dir ]]; then
    sl_log "cannot write $path: $dir is not a writable directory"
    return 1
  fi
  printf '%s\n' "$path"
}

# scripts/backing-services, which does not cd, reads a relative SL_STATE_DIR against its working
# directory. Scripts that cd first and then run it (test, run, bench, bench-instructions,
# cluster) would have it read against the repository instead: fix the meaning here, once.
if [[ -n ${SL_STATE_DIR-} && $SL_STATE_DIR != /* ]]; then
  SL_STATE_DIR=$(sl_abs_path "$SL_STATE_DIR")
  export SL_STATE_DIR
fi

# The scripts run programs from /usr/sbin (runuser in scripts/backing-services, nginx in
# scripts/cluster), which a non-login shell or `su` without `-` can leave off PATH. Appended,
# not prepended, so that the caller's own choices still come first.
for sl_sbin in /usr/sbin /sbin; do
  if [[ :${PATH-}: != *:"$sl_sbin":* ]]; then
    PATH=${PATH:+$PATH:}$sl_sbin
  fi
done
unset sl_sbin
export PATH

# Debian 12 packages, each group under a comment that says what needs it.
readonly SL_PACKAGES=(
  # Toolchain.
  cmake g++ make pkg-config clang-format
  # Libraries the server links.
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libmemcached-dev libpq-dev libssl-dev prometheus-cpp-dev
  # Standard .proto files (grpc/health/v1/health.proto).
  grpc-proto
  # Tests.
  libgtest-dev libgmock-dev python3-yaml nghttp2-client
  # The openssl command, which the TLS tests run to make their keys and certificates
  # (tls_config_test, tls_test).
  openssl
  # Backing services and their client tools (scripts/backing-services).
  memcached libmemcached-tools postgresql postgresql-contrib
  # ss, which names the process holding a port the services or the cluster need.
  iproute2
  # scripts/bench-instructions and its smoke test (callgrind).
  valgrind
  # jq, into which the README's examples pipe grpcurl's and sessionledger-cli's JSON.
  jq
)

# Installed with --no-install-recommends, in an apt-get call of their own (SL_PACKAGES keep
# their recommends: some may rely on them).
readonly SL_PACKAGES_NO_RECOMMENDS=(
  # Deploy checks: `docker-compose config` validates the compose file (tests/deploy/
  # check_compose.sh). It is Python and needs no Docker engine; its only recommend is docker.io,
  # which would bring containerd, runc, criu and needrestart (~260 MB) and their daemons.
  docker-compose
)

sl_log() { printf '==> %s\n' "$*" >&2; }

# sl_sanitizer_file_option NAME PATH: prints NAME=PATH quoted for the sanitizers' option parser,
# which splits values at spaces, commas and colons unless they are in single or double quotes,
# and has no escapes. So the quote is one PATH does not contain; a PATH with both cannot be
# written, and fails with a message naming it.
sl_sanitizer_file_option() {
  local name=$1 path=$2
  if [[ $path != *"'"* ]]; then
    printf "%s='%s'\n" "$name" "$path"
  elif [[ $path != *'"'* ]]; then
    printf '%s="%s"\n' "$name" "$path"
  else
    sl_log "cannot pass $path to the sanitizers: their options cannot quote a path holding both ' and \""
    return 1
  fi
}

# gRPC clients (sessionledger-cli) take an HTTP CONNECT proxy from http_proxy/https_proxy/
# grpc_proxy; the scripts' servers are on this host, which a proxy cannot reach or would only
# slow down. gRPC reads no_grpc_proxy instead of no_proxy when it is set, hence both.
sl_no_proxy_to_loopback() {
  export no_grpc_proxy="127.0.0.1,localhost,::1${no_grpc_proxy:+,$no_grpc_proxy}${no_proxy:+,$no_proxy}"
}

# sl_ctest_excluding REGEX [ctest args...]: sets the array SL_CTEST_ARGS to the ctest args with
# the tests labelled REGEX left out, whatever they select. CTest 3.25 honours one -LE only
# (given `-LE deploy -LE chaos` it left out neither), so the caller's own -LE/--label-exclude
# options join REGEX in a single one. Fails on an -LE without its expression.
sl_ctest_excluding() {
  local excluded=$1
  shift
  SL_CTEST_ARGS=()
  while (($# > 0)); do
    case $1 in
      -LE | --label-exclude)
        if (($# < 2)); then
          sl_log "$1 needs a regular expression"
          return 2
        fi
        excluded+="|($2)"
        shift 2
        ;;
      *)
        SL_CTEST_ARGS+=("$1")
        shift
        ;;
    esac
  done
  SL_CTEST_ARGS=(-LE "$excluded" ${SL_CTEST_ARGS[@]+"${SL_CTEST_ARGS[@]}"})
}

# sl_apt_get ARGS...: `apt-get -q ARGS` (non-interactive), retried while another apt or dpkg
# run holds a lock it needs; its exit status otherwise. On a fresh machine cloud-init or
# apt-daily often runs its own `apt-get update` at first: `-o DPkg::Lock::Timeout` waits only for
# dpkg's locks, and apt-get fails at once (exit 100, "Could not get lock
# /var/lib/apt/lists/lock") on the package lists' lock, or an install on the download
# directory's (/var/cache/apt/archives/lock). So a failure that reports a lock held elsewhere is
# retried every SL_APT_RETRY_INTERVAL seconds (default 5), each wait logged, until
# SL_APT_LOCK_WAIT seconds (default 300) have gone by; DPkg::Lock::Timeout gets what is left of
# them. Any other failure is returned at once. Messages are read in the C locale.
sl_apt_get() {
  local budget=${SL_APT_LOCK_WAIT:-300} interval=${SL_APT_RETRY_INTERVAL:-5}
  local start=$SECONDS attempt=1 left errors rc what=apt-get arg line skip=0
  # "apt-get update", "apt-get install": what the log lines name (-o, -c and -t take a value).
  for arg in "$@"; do
    if ((skip)); then
      skip=0
    elif [[ $arg == -[oct] ]]; then
      skip=1
    elif [[ $arg != -* ]]; then
      what+=" $arg"
      break
    fi
  done
  while :; do
    left=$((budget - (SECONDS - start)))
    ((left > 0)) || left=0
    # apt-get's stderr goes on to ours line by line and is kept, to tell a held lock from other
    # errors (a loop, not `tee /dev/fd/4`: /dev/fd cannot reopen a socket, which stderr under
    # systemd is). Its stdout goes to ours untouched.
    rc=0
    {
      errors=$(
        set -o pipefail
        DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get -q -o DPkg::Lock::Timeout="$left" "$@" \
          2>&1 >&3 3>&- 4>&- |
          while IFS= read -r line || [[ -n $line ]]; do
            printf '%s\n' "$line" >&4
            printf '%s\n' "$line"
          done
      ) || rc=$?
    } 3>&1 4>&2
    ((rc == 0)) && return 0
    if ! grep -qE '^E: (Could not get lock|Unable to lock|Unable to acquire the dpkg frontend lock)' \
      <<<"$errors"; then
      return "$rc"
    fi
    left=$((budget - (SECONDS - start)))
    if ((left <= 0)); then
      sl_log "$what: another apt or dpkg run (see the lock above) still held its lock after" \
        "${budget} s and $attempt attempts; giving up. Wait for it to finish (ps -C apt-get,dpkg" \
        "-f) and run again"
      return "$rc"
    fi
    ((interval < left)) || interval=$left
    sl_log "$what: another apt or dpkg run holds a lock (see above); attempt $attempt" \
      "failed, trying again in ${interval} s ($((SECONDS - start)) s of ${budget} s waited)"
    sleep "$interval"
    ((attempt++))
  done
}

sl_package_installed() {
  [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == 'install ok installed' ]]
}

# sl_package_service PACKAGE: the system service (systemd unit NAME.service, init script
# /etc/init.d/NAME) that installing PACKAGE adds and its postinst enables to start at boot:
# memcached (:11211), postgresql (postgresql-common's postgresql.service, which starts the 15/main
# cluster on :5432) and nginx-light (nginx-common's nginx.service, whose default site listens on
# 0.0.0.0:80). Fails for a package without one.
sl_package_service() {
  case $1 in
    memcached) echo memcached ;;
    postgresql) echo postgresql ;;
    nginx-light) echo nginx ;;
    *) return 1 ;;
  esac
}

sl_systemd_is_init() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }

# sl_service_known NAME: whether the machine has the system service NAME: a unit file
# NAME.service (masked included) or an init script /etc/init.d/NAME.
sl_service_known() {
  local f
  for f in "/etc/init.d/$1" "/etc/systemd/system/$1.service" "/run/systemd/system/$1.service" \
    "/lib/systemd/system/$1.service" "/usr/lib/systemd/system/$1.service"; do
    [[ -e $f || -L $f ]] && return 0
  done
  sl_systemd_has_unit "$1.service"
}

# sl_systemd_has_unit UNIT: whether systemd, as the init system, has a unit file UNIT. (Output
# captured, not piped to grep -q: under pipefail, systemctl killed by SIGPIPE would read as "no".)
sl_systemd_has_unit() {
  local listed
  sl_systemd_is_init || return 1
  listed=$(systemctl list-unit-files --no-legend --no-pager "$1" 2>/dev/null) || true
  [[ -n $listed ]]
}

# sl_disable_new_services NAME...: disables the system services NAME, which the caller found
# absent before its install (sl_service_known), so that they do not start at the next boot;
# logs the ones it disabled. With systemd as the init system, through `systemctl disable --now`
# (which also stops one that runs); otherwise (a container, say) through `update-rc.d NAME
# disable` when there is one, its failures ignored. Never fails.
sl_disable_new_services() {
  local name state now_disabled=() not_disabled=() undo='update-rc.d NAME enable'
  if sl_systemd_is_init; then
    undo='systemctl enable NAME'
    for name in "$@"; do
      # Not installed after all (an install that failed first): nothing to disable.
      sl_systemd_has_unit "$name.service" || continue
      state=$(systemctl is-enabled "$name.service" 2>/dev/null) || true
      if [[ $state != enabled ]] && ! systemctl --quiet is-active "$name.service" 2>/dev/null; then
        continue
      fi
      if systemctl --quiet disable --now "$name.service" >/dev/null 2>&1; then
        now_disabled+=("$name.service")
      else
        not_disabled+=("$name.service")
      fi
    done
  elif command -v update-rc.d >/dev/null 2>&1; then
    for name in "$@"; do
      [[ -e /etc/init.d/$name ]] || continue
      if update-rc.d "$name" disable >/dev/null 2>&1; then
        now_disabled+=("$name")
      fi
    done
  fi
  if ((${#now_disabled[@]} > 0)); then
    sl_log "disabled the system services this install added, which would start at boot:" \
      "${now_disabled[*]} (the scripts start their own; \`$undo\` undoes it)"
  fi
  if ((${#not_disabled[@]} > 0)); then
    sl_log "warning: could not disable ${not_disabled[*]}: they may start at the next boot" \
      "(systemctl disable --now ${not_disabled[*]})"
  fi
  return 0
}

# Installs whatever is missing from SL_PACKAGES and SL_PACKAGES_NO_RECOMMENDS. apt-get runs
# only when something is missing, so repeated runs cost a few dpkg-query calls.
sl_install_packages() {
  local missing=() missing_no_recommends=() pkg
  for pkg in "${SL_PACKAGES[@]}"; do
    sl_package_installed "$pkg" || missing+=("$pkg")
  done
  # Any nginx flavour will do; nginx-light is the smallest.
  if ! sl_package_installed nginx-light && ! sl_package_installed nginx; then
    missing+=(nginx-light)
  fi
  for pkg in "${SL_PACKAGES_NO_RECOMMENDS[@]}"; do
    sl_package_installed "$pkg" || missing_no_recommends+=("$pkg")
  done
  local all=("${missing[@]}" "${missing_no_recommends[@]}")
  if ((${#all[@]} == 0)); then
    return 0
  fi
  if [[ $EUID -ne 0 ]]; then
    sl_log "missing Debian packages: ${all[*]}"
    if ((${#missing[@]} > 0)); then
      sl_log "install them as root (apt-get install ${missing[*]}) and run again"
    fi
    if ((${#missing_no_recommends[@]} > 0)); then
      sl_log "install them as root (apt-get install --no-install-recommends" \
        "${missing_no_recommends[*]}) and run again"
    fi
    return 1
  fi
  sl_log "installing Debian packages: ${all[*]}"
  # Installing memcached, postgresql and nginx-light on a machine with an init system would
  # start their system-wide daemons (:11211, :5432, :80), which nothing here uses or stops and
  # which take CPU from builds and tests. While apt-get runs, a policy-rc.d that exits 101
  # ("action forbidden") keeps invoke-rc.d and deb-systemd-invoke from starting them. Our own
  # services are not affected: scripts/backing-services and scripts/cluster start memcached,
  # pg_ctl and nginx themselves, never through either. A policy-rc.d that exists already (a
  # container image's, an administrator's) is left as it is.
  # Their postinsts still enable them, to start at the next boot (nginx's default site on
  # 0.0.0.0:80): so afterwards the services this install added are disabled (and stopped, had
  # someone else's policy-rc.d let them start), see sl_disable_new_services. Only those that
  # the machine did not have before: one it had (an nginx of its own, a PostgreSQL of another
  # version under postgresql.service) is left as it is.
  # The subshell's EXIT trap does both however the install ends (success, failure,
  # SIGINT/SIGTERM/SIGHUP: a failed or interrupted install may have configured some packages),
  # and removes only our policy-rc.d: a file without our marker line is never removed.
  local new_services=() service
  for pkg in "${missing[@]}"; do
    if service=$(sl_package_service "$pkg") && ! sl_service_known "$service"; then
      new_services+=("$service")
    fi
  done
  (
    policy=/usr/sbin/policy-rc.d
    marker='# sessionledger: scripts/lib/common.sh, removed when its apt-get install ends'
    ours=0
    # shellcheck disable=SC2317 # invoked by the EXIT trap
    finish_install() {
      sl_disable_new_services ${new_services[@]+"${new_services[@]}"}
      if ((ours)) && grep -qxF "$marker" "$policy" 2>/dev/null; then
        rm -f "$policy"
      fi
    }
    trap finish_install EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # Set before the attempt, so that a signal right after it cannot leave our file behind;
    # the marker check keeps the trap off a file that was there before.
    ours=1
    set -C # create only if absent (O_EXCL)
    if printf '%s\n' '#!/bin/sh' "$marker" 'exit 101' 2>/dev/null >"$policy"; then
      set +C
      # (Not executable, it would be ignored: the install goes on either way.)
      if chmod 0755 "$policy"; then
        sl_log "system services do not start during the install ($policy, removed afterwards)"
      fi
    else
      set +C
      ours=0
    fi
    # Package lists on a fresh machine may be absent or stale, so update before installing.
    # sl_apt_get waits out another apt/dpkg run (cloud-init's, apt-daily's) for up to 5 minutes
    # instead of failing at once on a lock.
    sl_apt_get update || exit
    if ((${#missing[@]} > 0)); then
      sl_apt_get -y install "${missing[@]}" || exit
    fi
    if ((${#missing_no_recommends[@]} > 0)); then
      sl_apt_get -y install --no-install-recommends "${missing_no_recommends[@]}" || exit
    fi
  )
}

# sl_build BUILD_DIR [CMAKE_ARGS...]: configures (cheap when nothing changed) and builds.
# BUILD_DIR is absolute or relative to the repo root.
sl_build() {
  local build_dir=$1
  shift
  [[ $build_dir == /* ]] || build_dir=$SL_REPO_ROOT/$build_dir
  sl_log "configuring $build_dir ($*)"
  cmake -S "$SL_REPO_ROOT" -B "$build_dir" "$@"
  sl_log "building $build_dir"
  cmake --build "$build_dir" -j"$(nproc)"
}

# True if something accepts TCP connections on 127.0.0.1:PORT.
sl_tcp_open() {
  # shellcheck disable=SC2016 # expanded by the inner shell
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# sl_port_holder PORT: "NAME (pid PID)" of the process listening on TCP PORT, when `ss` can
# tell (as root it sees every process, otherwise only the caller's own); nothing otherwise.
sl_port_holder() {
  command -v ss >/dev/null 2>&1 || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null |
    sed -nE 's/.*users:\(\("([^"]*)",pid=([0-9]+).*/\1 (pid \2)/p' | head -n 1
}

# sl_free_offset PORT...: prints an offset D, a multiple of 1000, such that every PORT + D is a
# port (1024..65535) nobody listens on, to suggest a free set of ports that keeps its layout;
# fails if it finds none. Only a suggestion: a port can be taken between this and its use.
sl_free_offset() {
  local d p
  for d in 10000 20000 30000 1000 2000 3000 4000 5000 -1000 -2000 -3000 -10000; do
    for p in "$@"; do
      if ((p + d < 1024 || p + d > 65535)) || sl_tcp_open $((p + d)); then
        continue 2
      fi
    done
    echo "$d"
    return 0
  done
  return 1
}
