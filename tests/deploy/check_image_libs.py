#!/usr/bin/env python3
"""Checks that deploy/Dockerfile's runtime stage installs every shared library the server needs.

The image build itself fails on a missing library (it runs ldd), but CI has no Docker engine.
This check runs where the binary was built (Debian 12, the same release as the image): it maps
each library from `ldd BINARY` to its Debian package (`dpkg -S`) and requires that package to be
in the dependency closure of the runtime stage's `apt-get install` list, computed offline from
the installed packages' Depends. So a new library (say, a metrics library) without a matching
runtime package fails here, not on the first pod start.

Usage: check_image_libs.py BINARY [DOCKERFILE]
"""

import os
import re
import subprocess
import sys

# In debian:bookworm-slim already (Essential or required by apt/dpkg).
BASE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}


def fail(message):
    print(f"check_image_libs: {message}")
    sys.exit(1)


def runtime_packages(dockerfile):
    text = open(dockerfile, encoding="utf-8").read()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    stages = re.split(r"^FROM\s", text, flags=re.M)
    if len(stages) < 3:
        fail(f"{dockerfile}: expected a build and a runtime stage")
    runtime = stages[-1]
    packages = []
    for m in re.finditer(r"apt-get\s+install\s+([^&;\n]*)", runtime):
        packages += [w for w in m.group(1).split() if not w.startswith("-")]
    if not packages:
        fail(f"{dockerfile}: the runtime stage installs no packages")
    return packages


def installed_depends():
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Pre-Depends}\t${Depends}\n"],
        check=True, capture_output=True, text=True).stdout
    graph = {}
    for line in out.splitlines():
        name, pre, deps = (line.split("\t") + ["", ""])[:3]
        alternatives = []
        for field in (pre, deps):
            for dep in filter(None, (d.strip() for d in field.split(","))):
                names = [re.sub(r"[\s(:].*", "", a.strip()) for a in dep.split("|")]
                alternatives.append(names)
        graph[name] = alternatives
    return graph


def closure(roots, graph):
    seen, todo = set(), list(roots)
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        for names in graph.get(pkg, []):
            # apt picks the first installable alternative; any installed one will do here.
            chosen = next((n for n in names if n in graph), names[0])
            todo.append(chosen)
    return seen


def main():
    if len(sys.argv) not in (2, 3):
        fail(__doc__.strip().splitlines()[-1])
    binary = sys.argv[1]
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    dockerfile = sys.argv[2] if len(sys.argv) == 3 else os.path.join(root, "deploy", "Dockerfile")
    if not os.path.exists(binary):
        fail(f"{binary} does not exist (build sessionledger-server first)")

    wanted = runtime_packages(dockerfile)
    graph = installed_depends()
    missing_here = [p for p in wanted if p not in graph]
    if missing_here:
        fail(f"runtime packages {missing_here} are not Debian packages installed on this machine "
             f"(typo in deploy/Dockerfile, or not the release the image uses?)")
    available = closure(wanted, graph) | BASE_PACKAGES

    ldd = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    libs = re.findall(r"=>\s+(/\S+)", ldd)
    # usrmerge: dpkg may know a file under /lib or /usr/lib; ask once for every spelling.
    candidates = {}
    for lib in libs:
        real = os.path.realpath(lib)
        candidates[lib] = list(dict.fromkeys([
            real, lib, re.sub(r"^/lib/", "/usr/lib/", real), re.sub(r"^/usr/lib/", "/lib/", real)]))
    every_path = sorted({p for paths in candidates.values() for p in paths})
    out = subprocess.run(["dpkg", "-S"] + every_path, capture_output=True, text=True).stdout
    owners = {}
    for line in out.splitlines():
        pkgs, _, path = line.partition(": ")
        owners[path.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    unowned, missing = [], {}
    for lib in libs:
        owner = next((owners[p] for p in candidates[lib] if p in owners), None)
        if owner is None:
            unowned.append(lib)
        elif owner not in available:
            missing.setdefault(owner, []).append(os.path.basename(lib))
    if unowned or missing:
        print("check_image_libs: the runtime stage of deploy/Dockerfile lacks libraries the "
              "server links:")
        for pkg, names in sorted(missing.items()):
            print(f"  FAIL package {pkg} (for {', '.join(sorted(names))}) is not installed by "
                  f"the runtime stage's apt-get install, nor a dependency of what it installs")
        for lib in unowned:
            print(f"  FAIL {lib} belongs to no Debian package, so the runtime image cannot get it")
        sys.exit(1)
    print(f"check_image_libs: all {len(libs)} shared libraries of {os.path.basename(binary)} are "
          f"provided by the runtime stage's packages ({', '.join(wanted)})")


if __name__ == "__main__":
    main()
