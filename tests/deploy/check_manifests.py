#!/usr/bin/env python3
"""Checks the Kubernetes manifests under deploy/k8s/ (a kustomize base) without a cluster.

Parses every YAML file there (and the env files of its configMapGenerator) and asserts what
operators rely on: gRPC probes on the right port and service name, a grace period longer than
preStop + SHUTDOWN_NOTICE_MS + SHUTDOWN_GRACE_SECONDS (+ any part of DEFAULT_CALL_TIMEOUT_MS
beyond that grace: a call runs to its own deadline), resources, a locked-down security
context, labels and selectors that actually match between the Deployment, its Services, the PDB
and the HPA, container ports that agree with the server's defaults (read from
server/config/config.cc), the server's configuration in a generated (hash-named) ConfigMap,
MEMCACHED_URL naming the StatefulSet's pods, memcached nodes that are not ready before the
sessions' idle timeout and a PDB over them, libpq URLs that verify TLS naming sslrootcert, and
no Secret with a real value in the kustomization.

Usage: check_manifests.py [--root REPO_ROOT]
Exit status 0 when every check passes; 1 with one line per failed check otherwise; 2 when the
files cannot be read or parsed at all.
"""

import argparse
import os
import re
import sys
from urllib.parse import urlsplit, parse_qs

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("check_manifests: python3-yaml is missing (Debian: apt-get install python3-yaml)")

SERVER_NAME_LABEL = ("app.kubernetes.io/name", "sessionledger")
GRACE_DEFAULT_K8S = 30  # Kubernetes' terminationGracePeriodSeconds default
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet")


class Checker:
    def __init__(self, root):
        self.root = root
        self.k8s_dir = os.path.join(root, "deploy", "k8s")
        self.failures = []
        self.passed = 0
        self.docs = []  # (relative file, document)

    # --- reporting ---------------------------------------------------------------------------
    def check(self, condition, where, message):
        if condition:
            self.passed += 1
        else:
            self.failures.append(f"{where}: {message}")
        return bool(condition)

    # --- loading -----------------------------------------------------------------------------
    def load(self):
        if not os.path.isdir(self.k8s_dir):
            sys.exit(f"check_manifests: {self.k8s_dir} does not exist")
        files = sorted(
            f for f in os.listdir(self.k8s_dir) if f.endswith((".yaml", ".yml"))
        )
        if not files:
            sys.exit(f"check_manifests: no YAML files in {self.k8s_dir}")
        for name in files:
            path = os.path.join(self.k8s_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    loaded = [d for d in yaml.safe_load_all(f) if d is not None]
            except yaml.YAMLError as e:
                print(f"check_manifests: deploy/k8s/{name} is not valid YAML: {e}", file=sys.stderr)
                sys.exit(2)
            for doc in loaded:
                self.docs.append((name, doc))
        return files

    def objects(self, kind, files=None):
        return [
            (f, d)
            for f, d in self.docs
            if isinstance(d, dict) and d.get("kind") == kind and (files is None or f in files)
        ]


def server_defaults(root):
    """The server's defaults, {NAME: value}, as ConfigVariables() in server/config/config.cc
    lists them (check_compose.sh reads them here too)."""
    path = os.path.join(root, "server", "config", "config.cc")
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        sys.exit(f"check_manifests: cannot read {path}: {e}")
    start = text.find("ConfigVariables()")
    body = text[start:] if start >= 0 else ""
    defaults = dict(re.findall(r'\{\s*"([A-Z_][A-Z0-9_]*)"\s*,\s*"([^"]*)"', body))
    for name in ("PORT", "METRICS_PORT", "SHUTDOWN_GRACE_SECONDS", "SHUTDOWN_NOTICE_MS",
                 "DEFAULT_CALL_TIMEOUT_MS"):
        if name not in defaults:
            sys.exit(
                f"check_manifests: cannot find the default of {name} in ConfigVariables() "
                f"in server/config/config.cc"
            )
    return defaults


def load_configmap_generators(c, kust):
    """Adds the ConfigMaps kust's configMapGenerator makes (from env files and literals) to
    c.docs, as kustomize renders them; returns their names."""
    names = set()
    c.check(not (kust.get("generatorOptions") or {}).get("disableNameSuffixHash"),
            "kustomization.yaml", "generatorOptions.disableNameSuffixHash: a ConfigMap without "
            "the content hash in its name does not roll the pods that use it when it changes")
    for gen in kust.get("configMapGenerator") or []:
        name = gen.get("name")
        data = {}
        source = f"kustomization.yaml configMapGenerator {name}"
        for env_file in gen.get("envs") or []:
            source = env_file
            path = os.path.join(c.k8s_dir, env_file)
            if not c.check(os.path.isfile(path), "kustomization.yaml",
                           f"configMapGenerator {name}: env file {env_file} does not exist"):
                continue
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    key, sep, value = line.partition("=")
                    c.check(sep and key and not value.startswith(("'", '"')), f"{env_file}:{number}",
                            "must be KEY=VALUE, unquoted (kustomize keeps quotes in the value)")
                    data[key] = value
        for literal in gen.get("literals") or []:
            key, _, value = str(literal).partition("=")
            data[key] = value
        labels = (gen.get("options") or {}).get("labels") or {}
        c.docs.append((source, {"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": name, "labels": labels}, "data": data}))
        names.add(name)
    return names


def labels_match(selector, labels):
    """True when every key/value of a non-empty selector is in labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def parse_quantity(text):
    """Kubernetes quantity ("250m", "128Mi", "1", "1G") as a float, or None."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    if not m:
        return None
    scale = {
        None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    }[m.group(2)]
    return float(m.group(1)) * scale


def pod_spec(workload):
    return (((workload.get("spec") or {}).get("template") or {}).get("spec")) or {}


def pod_labels(workload):
    return ((((workload.get("spec") or {}).get("template") or {}).get("metadata") or {})
            .get("labels")) or {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    parser.add_argument("--root", default=default_root, help="repository root")
    parser.add_argument("--kustomize", action="store_true",
                        help="only render deploy/k8s with `kubectl kustomize` (exit 77, which "
                             "ctest reports as skipped, when kubectl is not installed)")
    args = parser.parse_args()

    c = Checker(args.root)
    files = c.load()
    if args.kustomize:
        kust = [d for f, d in c.docs if f == "kustomization.yaml"]
        if c.check(len(kust) == 1, "kustomization.yaml", "missing or has several documents"):
            load_configmap_generators(c, kust[0])  # The rendering holds them too.
            kustomize_build(c)
        report(c)
    defaults = server_defaults(c.root)
    known_variables = set(defaults)

    # --- kustomization -----------------------------------------------------------------------
    kust = [d for f, d in c.docs if f == "kustomization.yaml"]
    if not c.check(len(kust) == 1, "kustomization.yaml", "missing or has several documents"):
        report(c)
    kust = kust[0]
    resources = kust.get("resources") or []
    for r in resources:
        c.check(r in files, "kustomization.yaml", f"resource {r} does not exist in deploy/k8s/")
    for f in files:
        if f == "kustomization.yaml":
            continue
        if ".example." in f:
            c.check(f not in resources, "kustomization.yaml",
                    f"{f} is an example and must not be a resource")
        else:
            c.check(f in resources, "kustomization.yaml",
                    f"{f} is in deploy/k8s/ but not listed in resources (it would never deploy)")
    listed = set(resources)
    for f, d in c.objects("Secret"):
        c.check(f not in listed, f,
                "a Secret is part of the kustomization: DATABASE_URL must not be committed")
        for key, value in ((d.get("stringData") or {}) | (d.get("data") or {})).items():
            c.check("CHANGE_ME" in str(value), f,
                    f"example Secret key {key} must hold a CHANGE_ME placeholder, not a value")
    c.check(not kust.get("secretGenerator"), "kustomization.yaml",
            "secretGenerator would commit secret values; create the Secret out of band")
    # libpq 15 (Debian 12, the image) never reads the system CA store: a verifying sslmode
    # without sslrootcert looks for ~/.postgresql/root.crt, which the image's user lacks.
    for f in files:
        with open(os.path.join(c.k8s_dir, f), encoding="utf-8") as text:
            for number, line in enumerate(text, 1):
                for url in re.findall(r"postgres(?:ql)?://\S+", line):
                    if re.search(r"sslmode=verify-(ca|full)", url):
                        c.check("sslrootcert=" in url, f"{f}:{number}",
                                "sslmode=verify-ca/verify-full needs sslrootcert= (libpq 15 has "
                                "no system default): e.g. /etc/ssl/certs/ca-certificates.crt")
    image_names = {i.get("name") for i in kust.get("images") or []}
    generated_configmaps = load_configmap_generators(c, kust)

    # --- every object ------------------------------------------------------------------------
    for f, d in c.docs:
        if f == "kustomization.yaml":
            continue
        where = f"{f} {d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        c.check(d.get("apiVersion") and d.get("kind") and (d.get("metadata") or {}).get("name"),
                where, "needs apiVersion, kind and metadata.name")
        c.check("app.kubernetes.io/name" in ((d.get("metadata") or {}).get("labels") or {}),
                where, "needs an app.kubernetes.io/name label")

    # --- every workload: security context, resources, selectors ------------------------------
    workloads = [(f, d) for f, d in c.docs if d.get("kind") in WORKLOAD_KINDS]
    for f, w in workloads:
        where = f"{f} {w['kind']}/{w['metadata']['name']}"
        spec = pod_spec(w)
        labels = pod_labels(w)
        if w["kind"] != "Job":
            selector = ((w.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            c.check(labels_match(selector, labels), where,
                    f"spec.selector.matchLabels {selector} does not match the pod labels {labels}")
        pod_sc = spec.get("securityContext") or {}
        c.check(pod_sc.get("runAsUser", 1) != 0, where, "pod runAsUser is 0 (root)")
        containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
        c.check(containers, where, "has no containers")
        for ct in containers:
            cw = f"{where} container {ct.get('name')}"
            sc = ct.get("securityContext") or {}
            c.check(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cw,
                    "runAsNonRoot must be true (pod or container securityContext)")
            c.check(sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, cw,
                    "runAsUser is 0 (root)")
            c.check(sc.get("readOnlyRootFilesystem") is True, cw,
                    "securityContext.readOnlyRootFilesystem must be true")
            c.check(sc.get("allowPrivilegeEscalation") is False, cw,
                    "securityContext.allowPrivilegeEscalation must be false")
            c.check(sc.get("privileged") is not True, cw, "must not be privileged")
            drop = ((sc.get("capabilities") or {}).get("drop")) or []
            c.check("ALL" in drop, cw, "securityContext.capabilities.drop must contain ALL")
            c.check(not ((sc.get("capabilities") or {}).get("add")), cw,
                    "must not add capabilities")
            res = ct.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            c.check("cpu" in req and "memory" in req, cw,
                    "resources.requests needs cpu and memory")
            c.check("memory" in lim, cw, "resources.limits needs memory")
            if "memory" in req and "memory" in lim:
                rq, lm = parse_quantity(req["memory"]), parse_quantity(lim["memory"])
                c.check(rq is not None and lm is not None and rq <= lm, cw,
                        f"memory request {req['memory']} must be a quantity <= limit {lim['memory']}")

    # --- the server Deployment ---------------------------------------------------------------
    deployments = c.objects("Deployment")
    if not c.check(len(deployments) == 1, "deploy/k8s", "expected exactly one Deployment"):
        report(c)
    dfile, dep = deployments[0]
    dname = dep["metadata"]["name"]
    dwhere = f"{dfile} Deployment/{dname}"
    dlabels = pod_labels(dep)
    dspec = pod_spec(dep)
    c.check(dlabels.get(SERVER_NAME_LABEL[0]) == SERVER_NAME_LABEL[1], dwhere,
            f"pod template needs label {SERVER_NAME_LABEL[0]}: {SERVER_NAME_LABEL[1]}")
    replicas = (dep.get("spec") or {}).get("replicas", 1)
    c.check(isinstance(replicas, int) and replicas >= 3, dwhere,
            f"replicas is {replicas}; the base runs at least 3")
    servers = [ct for ct in dspec.get("containers") or [] if ct.get("name") == "server"]
    if not c.check(len(servers) == 1, dwhere, "needs exactly one container named 'server'"):
        report(c)
    server = servers[0]

    # Effective configuration: server defaults < ConfigMap (envFrom) < explicit env values.
    config = dict(defaults)
    cm_names = [
        (e.get("configMapRef") or {}).get("name")
        for e in server.get("envFrom") or [] if e.get("configMapRef")
    ]
    configmaps = {d["metadata"]["name"]: (f, d) for f, d in c.objects("ConfigMap")}
    c.check(cm_names, dwhere, "server container takes no envFrom configMapRef (config in a ConfigMap)")
    for name in cm_names:
        if not c.check(name in configmaps, dwhere, f"envFrom ConfigMap {name} is not in deploy/k8s"):
            continue
        cfile, cm = configmaps[name]
        c.check(name in generated_configmaps, dwhere,
                f"envFrom ConfigMap {name} is a plain resource: make it a configMapGenerator, so "
                f"that its name carries a hash of its content and a change rolls the pods (else "
                f"old pods keep the old MEMCACHED_URL while new ones take the new)")
        data = cm.get("data") or {}
        for key, value in data.items():
            c.check(key in known_variables, f"{cfile} ConfigMap/{name}",
                    f"{key} is not a server variable (typo?); known: see ConfigVariables()")
            c.check(isinstance(value, str), f"{cfile} ConfigMap/{name}",
                    f"{key} must be a quoted string")
        c.check("DATABASE_URL" not in data, f"{cfile} ConfigMap/{name}",
                "DATABASE_URL holds a password: take it from a Secret, not the ConfigMap")
        config.update({k: str(v) for k, v in data.items()})
    env = {e["name"]: e for e in server.get("env") or [] if "name" in e}
    for key, e in env.items():
        if "value" in e:
            config[key] = str(e["value"])
    db = env.get("DATABASE_URL") or {}
    c.check(((db.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"), dwhere,
            "DATABASE_URL must come from valueFrom.secretKeyRef")

    def int_config(name):
        try:
            return int(config[name])
        except (KeyError, ValueError):
            c.check(False, dwhere, f"{name}={config.get(name)!r} is not a whole number")
            return None

    port, metrics_port, grace = (int_config("PORT"), int_config("METRICS_PORT"),
                                 int_config("SHUTDOWN_GRACE_SECONDS"))
    c.check(port == int(defaults["PORT"]), dwhere,
            f"PORT is {port}, the server's default is {defaults['PORT']}: keep them equal so "
            f"probes, Services and clients agree")
    c.check(metrics_port == int(defaults["METRICS_PORT"]), dwhere,
            f"METRICS_PORT is {metrics_port}, the server's default is {defaults['METRICS_PORT']}")

    c.check(server.get("image") in image_names, dwhere,
            f"image {server.get('image')!r} is not named in kustomization images "
            f"{sorted(image_names)}, so overlays cannot set it")

    ports = {p.get("name"): p.get("containerPort") for p in server.get("ports") or []}
    c.check(ports.get("grpc") == port, dwhere,
            f"container port 'grpc' is {ports.get('grpc')}, PORT is {port}")
    if metrics_port:
        c.check(ports.get("metrics") == metrics_port, dwhere,
                f"container port 'metrics' is {ports.get('metrics')}, METRICS_PORT is {metrics_port}")

    # Probes: native gRPC against the overall health service "" on PORT; no shell in the image.
    for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = server.get(probe_name)
        if probe is None:
            c.check(probe_name == "startupProbe", dwhere, f"{probe_name} is missing")
            continue
        g = probe.get("grpc")
        if not c.check(isinstance(g, dict), dwhere,
                       f"{probe_name} must be a native grpc probe (the image has no shell and "
                       f"no grpc_health_probe)"):
            continue
        c.check(g.get("port") == port, dwhere,
                f"{probe_name}.grpc.port is {g.get('port')}, PORT is {port}")
        c.check(g.get("service", "") == "", dwhere,
                f"{probe_name}.grpc.service is {g.get('service')!r}; it must be \"\" (overall): "
                f"the per-service names follow Memcached/PostgreSQL, which all pods share, so a "
                f"backing-service blip would mark every pod unready/dead at once")

    lifecycle = server.get("lifecycle") or {}
    pre_stop = lifecycle.get("preStop") or {}
    c.check("exec" not in pre_stop, dwhere,
            "preStop uses exec; use preStop.sleep, the kubelet's own wait (nothing runs in "
            "the container)")
    sleep = (pre_stop.get("sleep") or {}).get("seconds")
    c.check(isinstance(sleep, int) and sleep > 0, dwhere,
            "lifecycle.preStop.sleep.seconds must be > 0 so endpoints are removed before drain")
    tgps = dspec.get("terminationGracePeriodSeconds", GRACE_DEFAULT_K8S)
    notice_ms = int_config("SHUTDOWN_NOTICE_MS")
    call_timeout_ms = int_config("DEFAULT_CALL_TIMEOUT_MS")
    if grace is not None and notice_ms is not None and call_timeout_ms is not None:
        # The last calls arrive as the notice ends. gRPC cancels what is still in flight when
        # the grace ends, but a handler waiting on PostgreSQL or Memcached runs on to its own
        # deadline, DEFAULT_CALL_TIMEOUT_MS after it arrived at the latest, and the process
        # exits only then (ServerApp::Wait; README "Shutdown"). Its 5 s beyond a call's
        # deadline is not counted: past them the server only logs that a store broke its word
        # and keeps waiting, without end, for the orchestrator's kill.
        overrun = max(0, call_timeout_ms / 1000 - grace)
        budget = (sleep if isinstance(sleep, int) else 0) + notice_ms / 1000 + grace + overrun
        c.check(isinstance(tgps, int) and tgps > budget, dwhere,
                f"terminationGracePeriodSeconds {tgps} must exceed preStop sleep {sleep} + "
                f"SHUTDOWN_NOTICE_MS {notice_ms} ms + SHUTDOWN_GRACE_SECONDS {grace} + what "
                f"DEFAULT_CALL_TIMEOUT_MS {call_timeout_ms} ms runs past the grace ({overrun} s) "
                f"= {budget} s, or SIGKILL cuts the drain short")

    tsc = dspec.get("topologySpreadConstraints") or []
    c.check(tsc, dwhere, "needs topologySpreadConstraints")
    for t in tsc:
        sel = (t.get("labelSelector") or {}).get("matchLabels") or {}
        c.check(labels_match(sel, dlabels), dwhere,
                f"topology spread on {t.get('topologyKey')} selects {sel}, not the server pods")

    ann = (((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
        "annotations") or {}
    if metrics_port:
        c.check(ann.get("prometheus.io/scrape") == "true", dwhere,
                "pod annotation prometheus.io/scrape must be \"true\"")
        c.check(ann.get("prometheus.io/port") == str(metrics_port), dwhere,
                f"pod annotation prometheus.io/port is {ann.get('prometheus.io/port')!r}, "
                f"METRICS_PORT is {metrics_port}")
        c.check(ann.get("prometheus.io/path") == "/metrics", dwhere,
                "pod annotation prometheus.io/path must be /metrics")

    # --- Services ----------------------------------------------------------------------------
    container_ports = {p.get("name"): p.get("containerPort") for p in server.get("ports") or []}
    server_services = []
    for f, s in c.objects("Service"):
        where = f"{f} Service/{s['metadata']['name']}"
        sel = (s.get("spec") or {}).get("selector") or {}
        targets = [w for _, w in workloads if labels_match(sel, pod_labels(w))]
        c.check(targets, where, f"selector {sel} matches no workload's pod labels")
        if not labels_match(sel, dlabels):
            continue
        server_services.append((where, s))
        for p in (s.get("spec") or {}).get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            resolved = container_ports.get(target) if isinstance(target, str) else target
            c.check(resolved in container_ports.values(), where,
                    f"port {p.get('name')} targets {target!r}, which is no container port of "
                    f"the server ({container_ports})")
            if p.get("name") == "grpc":
                c.check(p.get("port") == port, where,
                        f"service port grpc is {p.get('port')}, clients expect PORT {port}")
    headless = [w for w, s in server_services if (s.get("spec") or {}).get("clusterIP") == "None"]
    cluster_ip = [w for w, s in server_services
                  if (s.get("spec") or {}).get("clusterIP") != "None"
                  and (s.get("spec") or {}).get("type", "ClusterIP") == "ClusterIP"]
    c.check(len(headless) == 1, "deploy/k8s",
            f"expected one headless Service (clusterIP: None) for the server pods, found {headless}")
    c.check(len(cluster_ip) == 1, "deploy/k8s",
            f"expected one ClusterIP Service for the server pods, found {cluster_ip}")

    # --- PDB and HPA -------------------------------------------------------------------------
    pdbs = [(f, p) for f, p in c.objects("PodDisruptionBudget")
            if labels_match(((p.get("spec") or {}).get("selector") or {}).get("matchLabels") or {},
                            dlabels)]
    c.check(len(pdbs) == 1, "deploy/k8s",
            "expected one PodDisruptionBudget whose selector matches the server pods")
    hpas = c.objects("HorizontalPodAutoscaler")
    c.check(len(hpas) == 1, "deploy/k8s", "expected one HorizontalPodAutoscaler")
    min_replicas = None
    for f, h in hpas:
        where = f"{f} HorizontalPodAutoscaler/{h['metadata']['name']}"
        spec = h.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        c.check(ref.get("kind") == "Deployment" and ref.get("name") == dname
                and ref.get("apiVersion") == "apps/v1", where,
                f"scaleTargetRef {ref} must be apps/v1 Deployment {dname}")
        min_replicas = spec.get("minReplicas", 1)
        c.check(2 <= min_replicas <= spec.get("maxReplicas", 0), where,
                f"need 2 <= minReplicas ({min_replicas}) <= maxReplicas ({spec.get('maxReplicas')})")
        for m in spec.get("metrics") or []:
            name = (m.get("resource") or {}).get("name")
            if m.get("type") == "Resource" and name:
                c.check(name in ((server.get("resources") or {}).get("requests") or {}), where,
                        f"scales on {name} utilisation but the server requests no {name}")
    for f, p in pdbs:
        where = f"{f} PodDisruptionBudget/{p['metadata']['name']}"
        spec = p.get("spec") or {}
        floor = min(x for x in (replicas, min_replicas) if isinstance(x, int))
        if "minAvailable" in spec:
            c.check(isinstance(spec["minAvailable"], int) and spec["minAvailable"] < floor, where,
                    f"minAvailable {spec['minAvailable']} must be below the smallest replica "
                    f"count {floor}, or node drains block")
        else:
            c.check(isinstance(spec.get("maxUnavailable"), int) and spec["maxUnavailable"] >= 1
                    and spec["maxUnavailable"] < floor, where,
                    f"maxUnavailable {spec.get('maxUnavailable')} must be 1..{floor - 1}")

    # --- migrate Job -------------------------------------------------------------------------
    jobs = c.objects("Job")
    c.check(len(jobs) == 1, "deploy/k8s", "expected one migrate Job")
    for f, j in jobs:
        where = f"{f} Job/{j['metadata']['name']}"
        spec = pod_spec(j)
        cts = spec.get("containers") or []
        c.check(any((ct.get("args") or ct.get("command") or [])[-1:] == ["migrate"] for ct in cts),
                where, "no container runs `sessionledger-server migrate` (args: [\"migrate\"])")
        c.check(all(ct.get("image") == server.get("image") for ct in cts), where,
                "the migrate image must be the server's image (same schema version)")
        c.check(spec.get("restartPolicy") in ("Never", "OnFailure"), where,
                "restartPolicy must be Never or OnFailure")
        # A generated ConfigMap's name changes with its content, and a Job's pod template cannot
        # change once applied: a reference would make every config change fail `apply -k`.
        refs = [((e.get("valueFrom") or {}).get("configMapKeyRef") or {}).get("name")
                for ct in cts for e in ct.get("env") or []]
        refs += [(e.get("configMapRef") or {}).get("name")
                 for ct in cts for e in ct.get("envFrom") or []]
        c.check(not set(refs) & generated_configmaps, where,
                "must not read a generated ConfigMap (its name changes with its content, and a "
                "Job's pod template is immutable)")
        for ct in cts:
            jenv = {e["name"]: e for e in ct.get("env") or [] if "name" in e}
            ref = ((jenv.get("DATABASE_URL") or {}).get("valueFrom") or {}).get("secretKeyRef")
            c.check(ref == (db.get("valueFrom") or {}).get("secretKeyRef"), where,
                    "DATABASE_URL must come from the same secretKeyRef as the Deployment's")

    # --- memcached: StatefulSet, headless Service, MEMCACHED_URL -----------------------------
    url = config.get("MEMCACHED_URL", "")
    c.check(url.startswith("memcached://"), dwhere,
            f"MEMCACHED_URL {url!r} must be set (ConfigMap) and start with memcached://")
    parts = urlsplit(url)
    nodes = [n for n in parts.netloc.split(",") if n]
    extra = parse_qs(parts.query).get("replicas", ["0"])[0]
    c.check(extra.isdigit() and int(extra) < max(len(nodes), 1), dwhere,
            f"MEMCACHED_URL replicas={extra} needs more than {extra} nodes, it lists {len(nodes)}")
    stss = {s["metadata"]["name"]: (f, s) for f, s in c.objects("StatefulSet")}
    services = {s["metadata"]["name"]: s for _, s in c.objects("Service")}
    used = {}
    for node in nodes:
        host, _, node_port = node.partition(":")
        m = re.fullmatch(r"([a-z0-9-]+)-([0-9]+)\.([a-z0-9-]+)(\..*)?", host)
        if not c.check(m, dwhere, f"MEMCACHED_URL node {node} is not <statefulset>-<n>.<service>"):
            continue
        sts_name, ordinal, svc_name = m.group(1), int(m.group(2)), m.group(3)
        if not c.check(sts_name in stss, dwhere, f"MEMCACHED_URL node {node}: no StatefulSet "
                                                 f"{sts_name} in deploy/k8s"):
            continue
        sfile, sts = stss[sts_name]
        swhere = f"{sfile} StatefulSet/{sts_name}"
        sspec = sts.get("spec") or {}
        used.setdefault(sts_name, set()).add(ordinal)
        c.check(ordinal < sspec.get("replicas", 1), dwhere,
                f"MEMCACHED_URL node {node}: {sts_name} has only {sspec.get('replicas', 1)} replicas")
        c.check(sspec.get("serviceName") == svc_name, swhere,
                f"serviceName is {sspec.get('serviceName')!r}, MEMCACHED_URL uses {svc_name!r}")
        svc = services.get(svc_name)
        if c.check(svc, dwhere, f"MEMCACHED_URL node {node}: no Service {svc_name}"):
            c.check((svc.get("spec") or {}).get("clusterIP") == "None", f"Service/{svc_name}",
                    "must be headless (clusterIP: None) for per-pod DNS names")
            c.check(labels_match((svc.get("spec") or {}).get("selector") or {}, pod_labels(sts)),
                    f"Service/{svc_name}", f"selector does not match StatefulSet {sts_name}'s pods")
        mports = [p.get("containerPort") for ct in pod_spec(sts).get("containers") or []
                  for p in ct.get("ports") or []]
        c.check(node_port.isdigit() and int(node_port) in mports, dwhere,
                f"MEMCACHED_URL node {node}: port is not a container port of {sts_name} {mports}")
    for sts_name, ordinals in used.items():
        n = (stss[sts_name][1].get("spec") or {}).get("replicas", 1)
        c.check(ordinals == set(range(n)), dwhere,
                f"MEMCACHED_URL lists {sts_name} pods {sorted(ordinals)}, the StatefulSet runs "
                f"{n}: list every pod (consistent hashing needs the full, ordered list)")
        c.check(n >= 2, f"StatefulSet/{sts_name}", "run at least 2 memcached nodes")
        if not (extra.isdigit() and int(extra) >= 1):
            continue
        # With a second copy, a restarted node holds only what was used since; the other copy
        # must stay until then (see memcached.yaml): readiness no sooner than the idle timeout,
        # and a budget that takes one node at a time, none while another is not ready.
        sfile, sts = stss[sts_name]
        swhere = f"{sfile} StatefulSet/{sts_name}"
        ttl = int_config("SESSION_TTL_SECONDS")
        for ct in pod_spec(sts).get("containers") or []:
            delay = (ct.get("readinessProbe") or {}).get("initialDelaySeconds", 0)
            c.check(ttl is not None and isinstance(delay, int) and delay >= ttl, swhere,
                    f"container {ct.get('name')}: readinessProbe.initialDelaySeconds {delay} must "
                    f"be at least SESSION_TTL_SECONDS {ttl}, or a rolling update or two drains "
                    f"restart the second node before the first has the sessions back")
        budgets = [p for _, p in c.objects("PodDisruptionBudget")
                   if labels_match(((p.get("spec") or {}).get("selector") or {})
                                   .get("matchLabels") or {}, pod_labels(sts))]
        c.check(len(budgets) == 1 and (budgets[0].get("spec") or {}).get("maxUnavailable") == 1,
                swhere, "needs one PodDisruptionBudget with maxUnavailable: 1 over its pods")

    # --- NetworkPolicy: who may reach the servers and memcached (SECURITY.md) ----------------
    policies = c.objects("NetworkPolicy")
    def selecting(labels):
        return [p for _, p in policies
                if labels_match(((p.get("spec") or {}).get("podSelector") or {})
                                .get("matchLabels") or {}, labels)]
    server_policies = selecting(dlabels)
    c.check(len(server_policies) == 1, "deploy/k8s",
            "expected one NetworkPolicy over the server pods: SessionService trusts its callers")
    for p in server_policies + [q for name in used for q in selecting(pod_labels(stss[name][1]))]:
        pwhere = f"NetworkPolicy/{p['metadata']['name']}"
        c.check("Ingress" in ((p.get("spec") or {}).get("policyTypes") or []), pwhere,
                "policyTypes must include Ingress")
        for rule in (p.get("spec") or {}).get("ingress") or []:
            c.check(rule.get("ports") and rule.get("from"), pwhere,
                    "every ingress rule names its ports and its sources (a rule without them "
                    "opens every port, or to everyone)")
    for p in server_policies:
        for rule in (p.get("spec") or {}).get("ingress") or []:
            ports = {q.get("port") for q in rule.get("ports") or []}
            if "grpc" in ports or port in ports:
                c.check(all(((f.get("podSelector") or {}).get("matchLabels"))
                            for f in rule.get("from") or [{}]), f"NetworkPolicy/{p['metadata']['name']}",
                        "the gRPC port must be open only to labelled client pods")
    for sts_name in used:
        sts_labels = pod_labels(stss[sts_name][1])
        mpolicies = selecting(sts_labels)
        if not c.check(len(mpolicies) == 1, f"StatefulSet/{sts_name}",
                       "expected one NetworkPolicy over the memcached pods (no authentication: "
                       "whoever writes it can forge sessions)"):
            continue
        for rule in (mpolicies[0].get("spec") or {}).get("ingress") or [{}]:
            sources = rule.get("from") or [{}]
            c.check(all(labels_match((f.get("podSelector") or {}).get("matchLabels") or {},
                                     dlabels) and "namespaceSelector" not in f for f in sources),
                    f"NetworkPolicy/{mpolicies[0]['metadata']['name']}",
                    "memcached must take connections only from the server pods")

    report(c)


# The exit status ctest's SKIP_RETURN_CODE maps to "skipped" for the deploy_kustomize test.
SKIPPED = 77


def kustomize_build(c):
    """`kubectl kustomize` when kubectl is installed (it is not a Debian package; CI may lack
    it): catches what a plain YAML parse cannot, e.g. a broken kustomization field. Without
    kubectl it exits SKIPPED, so the run lists the check as skipped rather than passed."""
    import shutil
    import subprocess
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("check_manifests: kubectl not installed, skipping `kubectl kustomize deploy/k8s`")
        sys.exit(SKIPPED)
    r = subprocess.run([kubectl, "kustomize", c.k8s_dir], capture_output=True, text=True)
    if not c.check(r.returncode == 0, "kustomization.yaml",
                   f"`kubectl kustomize` fails: {r.stderr.strip()}"):
        return
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    listed = [d for f, d in c.docs if f != "kustomization.yaml" and ".example." not in f]
    c.check(len(built) == len(listed), "kustomization.yaml",
            f"`kubectl kustomize` renders {len(built)} objects, the files hold {len(listed)}")


def report(c):
    if c.failures:
        print(f"check_manifests: {len(c.failures)} check(s) failed in deploy/k8s/:")
        for failure in c.failures:
            print(f"  FAIL {failure}")
        print(f"check_manifests: {c.passed} checks passed, {len(c.failures)} failed")
        sys.exit(1)
    print(f"check_manifests: deploy/k8s/ OK, {c.passed} checks passed "
          f"({len(c.docs)} documents)")
    sys.exit(0)


if __name__ == "__main__":
    main()
