#!/usr/bin/env bash
# Validates docker-compose.yml, both nginx configs and deploy/Dockerfile without a Docker
# engine:
#   1. `docker-compose config -q` (schema, interpolation, anchors), then the properties the
#      stack relies on, read from the normalised `config` output;
#   2. `nginx -t` on deploy/nginx/nginx.conf (its /tmp paths moved into a temp prefix);
#   3. deploy/nginx/cluster.conf.template rendered with sample ports, then `nginx -t`;
#   4. static properties of deploy/Dockerfile (its libraries: check_image_libs.py).
# Needs Debian packages docker-compose, nginx-light (or nginx) and python3-yaml.
# Usage: tests/deploy/check_compose.sh [REPO_ROOT]. Exit 0 when all pass, 1 otherwise.
set -euo pipefail

root=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$root"

fail() {
  printf 'check_compose: FAIL %s\n' "$*" >&2
  exit 1
}

# Debian's python3 has python3-yaml; a pyenv/venv python3 first on PATH may not.
python=/usr/bin/python3
[[ -x $python ]] || python=$(command -v python3) || fail "python3 is missing"
"$python" -c 'import yaml' 2>/dev/null || fail "python3-yaml is missing (apt-get install python3-yaml)"

if command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  fail "neither docker-compose nor the docker compose plugin is installed (apt-get install docker-compose)"
fi
command -v nginx >/dev/null 2>&1 || PATH=$PATH:/usr/sbin
command -v nginx >/dev/null 2>&1 || fail "nginx is missing (apt-get install nginx-light)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- 1. docker-compose.yml -------------------------------------------------------------------
# A fixed project name and an empty environment for the variables the file interpolates, so
# the result does not depend on the caller's shell or a local .env.
export COMPOSE_PROJECT_NAME=sessionledger-check
unset POSTGRES_PASSWORD LOG_LEVEL
"${compose[@]}" -f docker-compose.yml config -q || fail "docker-compose.yml does not validate (see above)"
"${compose[@]}" -f docker-compose.yml config >"$tmp/compose.yml" ||
  fail "docker-compose config could not render docker-compose.yml"

"$python" - "$tmp/compose.yml" <<'PY' || fail "docker-compose.yml properties (see above)"
import re, sys, yaml

doc = yaml.safe_load(open(sys.argv[1]))
services = doc.get("services") or {}
errors = []

def check(ok, message):
    if not ok:
        errors.append(message)

def seconds(text):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(text or ""))
    return int(m.group(1) or 0) * 60 + float(m.group(2) or 0) if m and text else None

for name in ("memcached-1", "memcached-2", "postgres", "migrate", "server", "nginx"):
    check(name in services, f"service {name} is missing")
if errors:
    print("\n".join(f"check_compose: FAIL {e}" for e in errors), file=sys.stderr)
    sys.exit(1)

server, migrate, nginx, pg = (services[n] for n in ("server", "migrate", "nginx", "postgres"))
check(server.get("image") and server.get("image") == migrate.get("image"),
      "server and migrate must run the same image")
check(migrate.get("command") == ["migrate"], 'migrate must run command ["migrate"]')
check(migrate.get("restart", "no") in ("no", None), "migrate is one-shot: restart must be \"no\"")
check((server.get("deploy") or {}).get("replicas") == 3, "server needs deploy.replicas: 3")
deps = server.get("depends_on") or {}
check((deps.get("migrate") or {}).get("condition") == "service_completed_successfully",
      "server must depend on migrate with condition service_completed_successfully")
check((deps.get("postgres") or {}).get("condition") == "service_healthy",
      "server must depend on postgres with condition service_healthy")
check(((migrate.get("depends_on") or {}).get("postgres") or {}).get("condition")
      == "service_healthy", "migrate must depend on postgres with condition service_healthy")
check(pg.get("healthcheck"), "postgres needs a healthcheck (servers wait for service_healthy)")
for dep, cond in deps.items():
    if (cond or {}).get("condition") == "service_healthy":
        check((services.get(dep) or {}).get("healthcheck"),
              f"server waits for {dep} to be healthy, but {dep} has no healthcheck")
check(server.get("healthcheck"), "server needs a healthcheck")
for name in ("server", "migrate", "nginx"):
    check(services[name].get("read_only") is True, f"{name} must run with read_only: true")
check(str(pg.get("image", "")).startswith("postgres:15"), "postgres must be PostgreSQL 15")
def mounts(service):
    """(source, target) of each volume; docker-compose v1 prints strings, v2 mappings."""
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            yield str(v.get("source", "")), str(v.get("target", ""))
        else:
            parts = str(v).split(":")
            yield (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])

check(any(src in (doc.get("volumes") or {}) and dst == "/var/lib/postgresql/data"
          for src, dst in mounts(pg)),
      "postgres data (/var/lib/postgresql/data) must live in a named volume")

for name in ("server", "migrate"):
    env = services[name].get("environment") or {}
    check(str(env.get("DATABASE_URL", "")).startswith(("postgres://", "postgresql://")),
          f"{name}: DATABASE_URL must be a postgres:// URL")
# What `sessionledger-server migrate` reads (LoadMigrateConfig in server/config/config.cc): a
# server setting there would suggest the migration uses it.
extra = sorted(set(migrate.get("environment") or {}) - {"LOG_LEVEL", "DATABASE_URL",
                                                        "DATABASE_POOL_SIZE"})
check(not extra, f"migrate reads only LOG_LEVEL, DATABASE_URL and DATABASE_POOL_SIZE; "
                 f"it is given {', '.join(extra)} too")
env = server.get("environment") or {}
check(str(env.get("MEMCACHED_URL", "")).startswith(
          "memcached://memcached-1:11211,memcached-2:11211"),
      "server: MEMCACHED_URL must name memcached-1:11211,memcached-2:11211")
check("replicas=1" in str(env.get("MEMCACHED_URL", "")),
      "server: MEMCACHED_URL needs ?replicas=1 (a session survives one memcached node)")
# The server's own defaults, read from server/config/config.cc as check_manifests.py reads
# them, for the settings the compose file leaves unset.
sys.dont_write_bytecode = True  # No __pycache__ in the checkout.
sys.path.insert(0, "tests/deploy")
from check_manifests import server_defaults
defaults = server_defaults(".")
def setting(name):
    return int(env.get(name, defaults[name]))
grace = setting("SHUTDOWN_GRACE_SECONDS")
notice = setting("SHUTDOWN_NOTICE_MS") / 1000
# As in check_manifests.py: a handler waiting on a backing service runs on to its own deadline,
# DEFAULT_CALL_TIMEOUT_MS after the last call arrived, and the process exits only then.
overrun = max(0, setting("DEFAULT_CALL_TIMEOUT_MS") / 1000 - grace)
stop = seconds(server.get("stop_grace_period"))
check(stop is not None and stop > notice + grace + overrun,
      f"server stop_grace_period {server.get('stop_grace_period')} must exceed "
      f"SHUTDOWN_NOTICE_MS + SHUTDOWN_GRACE_SECONDS + what DEFAULT_CALL_TIMEOUT_MS runs past the "
      f"grace ({notice} + {grace} + {overrun} s), or Docker SIGKILLs the drain")

def ports(service):
    """(host_ip, published, target) triples; docker-compose v1 and v2 print mappings, strings
    are HOST_IP:PUBLISHED:TARGET or PUBLISHED:TARGET."""
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            yield str(p.get("host_ip", "")), str(p.get("published", "")), str(p.get("target", ""))
        else:
            parts = str(p).split("/")[0].split(":")
            yield ((parts[-3] if len(parts) > 2 else ""), (parts[-2] if len(parts) > 1 else ""),
                   parts[-1])

check(("127.0.0.1", "50051", "50051") in set(ports(nginx)),
      "nginx must publish 127.0.0.1:50051 to its port 50051 (`grpcurl localhost:50051`; "
      "loopback only, as the stack is plaintext and unauthenticated)")
check(((nginx.get("depends_on") or {}).get("server") or {}).get("condition") == "service_healthy",
      "nginx must wait for a healthy server (service_healthy), or its first calls get 502")
check(any(src.endswith("deploy/nginx/nginx.conf") and dst == "/etc/nginx/nginx.conf"
          for src, dst in mounts(nginx)),
      "nginx must mount deploy/nginx/nginx.conf at /etc/nginx/nginx.conf")
check(not server.get("ports"), "server replicas must not publish host ports (nginx fronts them)")

if errors:
    print("\n".join(f"check_compose: FAIL {e}" for e in errors), file=sys.stderr)
    sys.exit(1)
PY

# --- 2. deploy/nginx/nginx.conf --------------------------------------------------------------
conf=deploy/nginx/nginx.conf
grep -Eq '^[[:space:]]*listen[[:space:]]+50051[[:space:]]+http2;' "$conf" ||
  fail "$conf must listen on 50051 with http2"
grep -Eq 'set[[:space:]]+\$[a-z_]+[[:space:]]+server:50051;' "$conf" ||
  fail "$conf must send calls to server:50051 (through a variable, so Docker DNS is re-read)"
grep -Eq '^[[:space:]]*resolver[[:space:]]+127\.0\.0\.11' "$conf" ||
  fail "$conf needs resolver 127.0.0.11 (Docker's DNS) to find replicas"
grep -Eq '^[[:space:]]*grpc_pass[[:space:]]+grpc://' "$conf" || fail "$conf must use grpc_pass"
mkdir -p "$tmp/compose-nginx"
# Its pid and temp files are under /tmp (a tmpfs in the container); keep this run's in $tmp.
sed "s#/tmp/#$tmp/compose-nginx/#g" "$conf" >"$tmp/compose-nginx/nginx.conf"
nginx -t -q -e "$tmp/compose-nginx/error.log" -p "$tmp/compose-nginx/" \
  -c "$tmp/compose-nginx/nginx.conf" || fail "nginx -t rejects $conf (see above)"

# --- 3. deploy/nginx/cluster.conf.template ---------------------------------------------------
template=deploy/nginx/cluster.conf.template
# scripts/cluster runs nginx in <state dir>/cluster/nginx, under the checkout by default: a
# checkout's path may hold a space, a quote, a `$` or an `&`, and the config must not care.
dir="$tmp/cluster dir with \"quotes\" 'and' \$dollar & ampersand"
mkdir -p "$dir"
servers=$(for port in 50061 50062 50063; do
  printf '    server 127.0.0.1:%s max_fails=1 fail_timeout=2s;\n' "$port"
done)
awk -v port=50051 -v ups="$servers" '
  /^[ \t]*@UPSTREAMS@[ \t]*$/ { print ups; next }
  { gsub(/@LISTEN_PORT@/, port); print }' "$template" >"$dir/nginx.conf"
if grep -v '^[[:space:]]*#' "$dir/nginx.conf" | grep -q '@[A-Z_]*@'; then
  fail "$template has a placeholder the documented rendering does not replace"
fi
[[ $(grep -c '^[[:space:]]*server 127\.0\.0\.1:5006[123] ' "$dir/nginx.conf") == 3 ]] ||
  fail "$template: @UPSTREAMS@ must stand on a line of its own inside the upstream block"
grep -Eq '^[[:space:]]*grpc_pass[[:space:]]+grpc://' "$dir/nginx.conf" ||
  fail "$template must use grpc_pass grpc://"
if grep -Eq '^[[:space:]]*grpc_next_upstream[[:space:]].*non_idempotent' "$dir/nginx.conf"; then
  fail "$template must not retry non-idempotent calls (a Transfer could be applied twice)"
fi
nginx -t -q -e "$dir/error.log" -p "$dir/" -c "$dir/nginx.conf" ||
  fail "nginx -t rejects the rendered $template (see above)"

# --- 4. deploy/Dockerfile ---------------------------------------------------------------------
df=deploy/Dockerfile
# Instructions only, continuation lines joined, comments dropped.
instructions=$(grep -v '^[[:space:]]*#' "$df" | sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta')
runtime=$(awk '/^FROM /{stage=$0 ORS; next} {stage=stage $0 ORS} END{printf "%s", stage}' \
  <<<"$instructions")
[[ $(grep -c '^FROM ' <<<"$instructions") -ge 2 ]] || fail "$df must be multi-stage"
grep -q '^ARG RUNTIME_IMAGE=debian:bookworm-slim$' <<<"$instructions" ||
  fail "$df: the runtime base must be debian:bookworm-slim (ARG RUNTIME_IMAGE)"
grep -q 'CMAKE_BUILD_TYPE=Release' <<<"$instructions" || fail "$df must build with CMAKE_BUILD_TYPE=Release"
grep -Eq 'ctest .*-L unit' <<<"$instructions" || fail "$df must run the unit tests (ctest -L unit)"
if grep -Eiq '(curl|wget)[[:space:]]|^ADD[[:space:]]+https?://' <<<"$instructions"; then
  fail "$df downloads something; use Debian packages and build arguments instead"
fi
grep -Eq '^ENTRYPOINT \["sessionledger-server"\]$' <<<"$runtime" ||
  fail "$df: the runtime stage needs exec-form ENTRYPOINT [\"sessionledger-server\"] (no shell)"
grep -Eq '^HEALTHCHECK .*CMD \["sessionledger-server", "healthcheck"\]$' <<<"$runtime" ||
  fail "$df: the runtime stage needs an exec-form HEALTHCHECK running \`sessionledger-server healthcheck\`"
user=$(grep '^USER ' <<<"$runtime" | tail -n1 | awk '{print $2}' || true)
[[ $user =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] ||
  fail "$df: the runtime stage must end as a numeric non-root USER (runAsNonRoot), not '$user'"
if grep -Eq -- '-dev([[:space:]]|$)|[[:space:]](g\+\+|cmake|gcc)([[:space:]]|$)' \
  <<<"$(grep 'apt-get' <<<"$runtime")"; then
  fail "$df: the runtime stage installs build tools or -dev packages"
fi
{ grep -Eq '^EXPOSE .*\b50051\b' <<<"$runtime" && grep -Eq '^EXPOSE .*\b9464\b' <<<"$runtime"; } ||
  fail "$df: the runtime stage must EXPOSE 50051 and 9464 (the server's defaults)"
[[ -f .dockerignore ]] || fail ".dockerignore is missing at the repository root"

echo "check_compose: docker-compose.yml, $conf, $template and $df OK"
