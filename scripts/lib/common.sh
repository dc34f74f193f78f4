# shellcheck shell=bash
# Steps shared by scripts/run and scripts/test: installing the Debian packages the build, the
# tests and the backing services need, and configuring/building with CMake.
# Source this file; it defines functions and SL_REPO_ROOT and runs nothing.

SL_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
readonly SL_REPO_ROOT

# Debian 12 packages (see shared/toolchain.md for why each library is there).
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
  # Deploy checks: compose file validation (no Docker engine needed).
  docker-compose
  # Backing services and their client tools (scripts/backing-services).
  memcached libmemcached-tools postgresql postgresql-contrib
  # scripts/bench-instructions and its smoke test (callgrind).
  valgrind
)

sl_log() { printf '==> %s\n' "$*" >&2; }

sl_package_installed() {
  [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == 'install ok installed' ]]
}

# Installs whatever is missing from SL_PACKAGES. apt-get runs only when something is missing,
# so repeated runs cost a few dpkg-query calls.
sl_install_packages() {
  local missing=() pkg
  for pkg in "${SL_PACKAGES[@]}"; do
    sl_package_installed "$pkg" || missing+=("$pkg")
  done
  # Any nginx flavour will do; nginx-light is the smallest.
  if ! sl_package_installed nginx-light && ! sl_package_installed nginx; then
    missing+=(nginx-light)
  fi
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  if [[ $EUID -ne 0 ]]; then
    sl_log "missing Debian packages: ${missing[*]}"
    sl_log "install them as root (apt-get install ${missing[*]}) and run again"
    return 1
  fi
  sl_log "installing Debian packages: ${missing[*]}"
  # Package lists on a fresh machine may be absent or stale, so update before installing.
  # The lock timeout waits out another apt/dpkg run instead of failing at once.
  DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update
  DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 install "${missing[@]}"
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
