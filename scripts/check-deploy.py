#!/usr/bin/env python3
"""Offline checks of deploy/ (issue 12), run by scripts/test.sh with the venv's Python.

  python scripts/check-deploy.py                       # every check; exit 1 with the failures
  python scripts/check-deploy.py --docker-build-debug  # print the Dockerfile's cargo build
                                                       # command without --release (CI runs it)

Checks:
  metrics    the kestrel_ metric names and types, from service/src/serve/metrics.rs and
             plugins/src/kestrelinfer/stats.rs (the `pub const` names and their describe_* calls)
  grafana    deploy/grafana/kestrel.json parses; every kestrel_ series in its queries exists
             (histograms only as _bucket/_sum/_count, quantiles only over _bucket); every metric
             is on the dashboard
  rules      promtool check rules, promtool test rules (kestrel-rules.test.yml); the rules' and the
             adapter rule's kestrel_ series exist
  k8s        the Kustomize base rendered (kubectl kustomize, when kubectl is installed; otherwise
             the files the kustomization lists), validated by kubernetes-validate --strict against
             the Kubernetes API schemas; the ServiceMonitor (a CRD without a schema there) by
             hand; probes, GPU requests, termination grace >= preStop + request_timeout_s, ports,
             selectors, the HPA's metric, the mounted config and token paths
  docker     deploy/Dockerfile: a Rust build stage at least the workspace's rust-version, its
             cargo build line equal to scripts/gpu-bundle.sh's, a CUDA runtime final stage whose
             CUDA major matches cudarc's feature, no build tools there, a non-root USER,
             HEALTHCHECK on /v2/health/ready, EXPOSE = the config's port, the ENTRYPOINT on the
             copied config, a .dockerignore without target/.venv/.git
  systemd    systemd-analyze verify prints nothing for deploy/systemd/kestrel.service (with the
             binary path pointed at target/debug/kestrel); the hardening options are present;
             TimeoutStopSec covers request_timeout_s
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
failures: list[str] = []


def fail(check: str, msg: str) -> None:
    failures.append(f"{check}: {msg}")


def need(tool: str, fix: str) -> str:
    # The venv's own scripts first (kubernetes-validate), then PATH.
    path = shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)
    if path is None:
        sys.exit(f"check-deploy: {tool} is missing: {fix}")
    return path


# ---- metrics ---------------------------------------------------------------------------------
def metric_types() -> dict[str, str]:
    """kestrel_ metric name -> counter | gauge | histogram, from the Rust sources."""
    out: dict[str, str] = {}
    for f in ["service/src/serve/metrics.rs", "plugins/src/kestrelinfer/stats.rs"]:
        src = (ROOT / f).read_text()
        consts = dict(re.findall(r'pub const (\w+): &str = "(kestrel_\w+)";', src))
        for kind, const in re.findall(r"describe_(counter|gauge|histogram)!\(\s*(\w+)", src):
            if const in consts:
                out[consts[const]] = kind
        for const, name in consts.items():
            if name not in out:
                fail("metrics", f"{f}: {name} ({const}) has no describe_* call")
    if len(out) < 10:
        fail("metrics", f"only {len(out)} metrics found: the parsing no longer matches the sources")
    return out


def series_names(types: dict[str, str]) -> set[str]:
    names = set()
    for name, kind in types.items():
        if kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            names.add(name)
    return names


def check_exprs(check: str, exprs: list[str], known: set[str]) -> set[str]:
    used = set()
    for e in exprs:
        for name in re.findall(r"\bkestrel_[a-z0-9_]+", e):
            used.add(name)
            if name not in known:
                fail(check, f"{name} is not a series the service or the element exports (in {e!r})")
        for inner in re.findall(r"histogram_quantile\([^,]+,(.*)", e):
            for name in re.findall(r"\bkestrel_[a-z0-9_]+", inner):
                if not name.endswith("_bucket"):
                    fail(check, f"histogram_quantile over {name}, not a _bucket series")
    return used


# ---- grafana ---------------------------------------------------------------------------------
def check_grafana(types: dict[str, str]) -> None:
    f = DEPLOY / "grafana/kestrel.json"
    try:
        dash = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        fail("grafana", f"{f}: not JSON: {e}")
        return
    exprs: list[str] = []
    ids = []

    def walk(p):
        for panel in p:
            ids.append(panel.get("id"))
            if panel.get("type") != "row":
                targets = panel.get("targets") or []
                if not targets:
                    fail("grafana", f"panel {panel.get('title')!r} has no query")
                exprs.extend(t.get("expr", "") for t in targets)
            walk(panel.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        exprs.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    if len(ids) != len(set(ids)):
        fail("grafana", "panel ids repeat")
    if not dash.get("uid") or not dash.get("title"):
        fail("grafana", "the dashboard needs a uid and a title")
    used = check_exprs("grafana", exprs, series_names(types))
    for name, kind in types.items():
        forms = {name} if kind != "histogram" else {name + s for s in ("_bucket", "_sum", "_count")}
        if not forms & used:
            fail("grafana", f"{name} is exported but not on the dashboard")


# ---- prometheus rules ------------------------------------------------------------------------
def check_rules(types: dict[str, str]) -> None:
    promtool = need("promtool", "run `bash scripts/setup.sh` (Debian package prometheus)")
    d = DEPLOY / "prometheus"
    for args in (["check", "rules", "kestrel-rules.yml"], ["test", "rules", "kestrel-rules.test.yml"]):
        r = subprocess.run([promtool, *args], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            fail("rules", f"promtool {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    rules = yaml.safe_load((d / "kestrel-rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    alerts = {r.get("alert") for g in rules["groups"] for r in g["rules"]}
    for want in ("KestrelHighErrorRate", "KestrelP99LatencyHigh", "KestrelEngineRebuilt"):
        if want not in alerts:
            fail("rules", f"alert {want} is missing")
    adapter = yaml.safe_load((d / "adapter-rules.yaml").read_text())
    for r in adapter["rules"]["custom"]:
        exprs += [r["seriesQuery"], r["name"]["as"]]
    check_exprs("rules", exprs, series_names(types))


# ---- kubernetes ------------------------------------------------------------------------------
def k8s_docs() -> list[dict]:
    base = DEPLOY / "k8s"
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True)
        if r.returncode != 0:
            fail("k8s", f"kubectl kustomize {base} failed: {r.stderr.strip()}")
            return []
        print("check-deploy: k8s rendered with kubectl kustomize")
        return [d for d in yaml.safe_load_all(r.stdout) if d]
    print("check-deploy: kubectl is not installed: validating the base's files unrendered")
    k = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = []
    for res in k["resources"]:
        docs += [d for d in yaml.safe_load_all((base / res).read_text()) if d]
    return docs


def check_k8s(types: dict[str, str], config: dict) -> None:
    validate = need(
        "kubernetes-validate",
        "run `bash scripts/setup.sh` (scripts/requirements.txt installs it into .venv)",
    )
    if (DEPLOY / "k8s/kestrel.toml").read_bytes() != (DEPLOY / "kestrel.toml").read_bytes():
        fail("k8s", "deploy/k8s/kestrel.toml differs from deploy/kestrel.toml: copy it over "
             "(Kustomize reads files only from inside its base)")
    docs = k8s_docs()
    by_kind = {d["kind"]: d for d in docs}
    for kind in ("Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"):
        if kind not in by_kind:
            fail("k8s", f"no {kind} in the base")
    if failures:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for i, d in enumerate(docs):
            if d["kind"] == "ServiceMonitor":
                continue
            p = Path(tmp) / f"{i}-{d['kind']}.yaml"
            p.write_text(yaml.safe_dump(d))
            r = subprocess.run([validate, "--strict", "--quiet", "-k", "1.32.0", str(p)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                fail("k8s", f"kubernetes-validate {d['kind']}: {r.stdout}{r.stderr}")
    dep, svc, sm, hpa = (by_kind[k] for k in
                         ("Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"))
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/v2/health/ready":
        fail("k8s", "the readiness probe must GET /v2/health/ready")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/v2/health/live":
        fail("k8s", "the liveness probe must GET /v2/health/live")
    for part in ("requests", "limits"):
        if str(c["resources"].get(part, {}).get("nvidia.com/gpu")) != "1":
            fail("k8s", f"resources.{part} must ask for nvidia.com/gpu")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_s = float(pre[-1]) if pre[:1] == ["sleep"] else 0.0
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    drain = float(config.get("request_timeout_s", 30.0))
    if grace < pre_s + drain:
        fail("k8s", f"terminationGracePeriodSeconds {grace} < preStop {pre_s} s + drain "
             f"(request_timeout_s {drain} s)")
    port = int(config["listen"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if ports.get("http") != port:
        fail("k8s", f"containerPort http {ports.get('http')} != the config's port {port}")
    labels = pod["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
        fail("k8s", "the Service's selector does not match the pod's labels")
    if any(labels.get(k) != v for k, v in dep["spec"]["selector"]["matchLabels"].items()):
        fail("k8s", "the Deployment's selector does not match its pod labels")
    svc_labels = svc["metadata"].get("labels", {})
    if any(svc_labels.get(k) != v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
        fail("k8s", "the ServiceMonitor's selector does not match the Service's labels")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for e in sm["spec"]["endpoints"]:
        if e.get("port") not in svc_ports or e.get("path", "/metrics") != "/metrics":
            fail("k8s", f"ServiceMonitor endpoint {e} must scrape a Service port's /metrics")
    if sm["apiVersion"] != "monitoring.coreos.com/v1":
        fail("k8s", "ServiceMonitor apiVersion must be monitoring.coreos.com/v1")
    if hpa["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
        fail("k8s", "the HPA does not target the Deployment")
    for m in hpa["spec"]["metrics"]:
        check_exprs("k8s", [m.get(m["type"].lower(), {}).get("metric", {}).get("name", "")],
                    series_names(types))
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for path in ("/etc/kestrel/kestrel.toml", config.get("control_token_file"),
                 config.get("repository")):
        if path and path not in mounts:
            fail("k8s", f"{path} (from the config / Dockerfile) is not mounted")


# ---- Dockerfile ------------------------------------------------------------------------------
def docker_lines() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def docker_cargo_build() -> list[str]:
    for line in docker_lines():
        m = re.match(r"RUN\s+(cargo build[^&;]*)", line)
        if m:
            return m.group(1).split()
    sys.exit("check-deploy: deploy/Dockerfile has no `RUN cargo build` line")


def check_docker(config: dict) -> None:
    lines = docker_lines()
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    if len(stages) < 2:
        fail("docker", "the Dockerfile must have a build stage and a final stage")
        return
    build, final = stages[0], stages[-1]
    m = re.match(r"FROM rust:1\.(\d+)", build[0])
    want = int(re.search(r'rust-version = "1\.(\d+)"', (ROOT / "Cargo.toml").read_text())[1])
    if not m or int(m[1]) < want:
        fail("docker", f"the build stage must be rust:1.{want} or newer: {build[0]}")
    cargo = " ".join(docker_cargo_build())
    bundle = (ROOT / "scripts/gpu-bundle.sh").read_text()
    if "--locked" not in cargo or cargo not in bundle.splitlines():
        fail("docker", f"`{cargo}` is not the cargo build line of scripts/gpu-bundle.sh")
    cudarc = re.search(r'"cuda-(\d+)"', (ROOT / "Cargo.toml").read_text())
    m = re.match(r"FROM nvidia/cuda:(\d+)\.\S*-cudnn-runtime-", final[0])
    if not m:
        fail("docker", f"the final stage must be an nvidia/cuda cudnn-runtime image: {final[0]}")
    elif cudarc and int(m[1]) != int(cudarc[1]) // 1000:
        fail("docker", f"the image's CUDA {m[1]} is not cudarc's {cudarc[1]}")
    final_text = "\n".join(final[1:])
    for tool in ("cargo", "rustc", "gcc", "g++", "build-essential", "make", "clang"):
        for line in final[1:]:
            if line.startswith("RUN") and "install" in line and re.search(
                    rf"(?<![\w-]){re.escape(tool)}(?![\w-])", line):
                fail("docker", f"the final stage installs {tool}")
    if re.search(r"^COPY (?!--from=)(?!deploy/)", final_text, re.M):
        fail("docker", "the final stage copies sources; only the binary and deploy/ files")
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        fail("docker", "the final stage must switch to a non-root USER")
    if "/v2/health/ready" not in " ".join(line for line in final if line.startswith("HEALTHCHECK")):
        fail("docker", "HEALTHCHECK must probe /v2/health/ready")
    port = config["listen"].rsplit(":", 1)[1]
    if f"EXPOSE {port}" not in final:
        fail("docker", f"EXPOSE {port} (the config's port) is missing")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for path in ("target", ".venv", ".git"):
        if path not in ignore:
            fail("docker", f"deploy/Dockerfile.dockerignore must leave {path} out of the context")
    entry = next((line for line in final if line.startswith("ENTRYPOINT")), "")
    copied = [line.split()[-1] for line in final if line.startswith("COPY deploy/kestrel.toml")]
    if not copied or copied[0] not in entry or "--config" not in entry:
        fail("docker", "ENTRYPOINT must run `kestrel serve --config` on the copied deploy/kestrel.toml")


# ---- systemd ---------------------------------------------------------------------------------
def check_systemd(config: dict) -> None:
    unit = (DEPLOY / "systemd/kestrel.service").read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    for k, v in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                 "ProtectHome": "yes"}.items():
        if keys.get(k) != v:
            fail("systemd", f"{k}={v} is missing")
    if "DynamicUser" not in keys and "User" not in keys:
        fail("systemd", "the unit must run as DynamicUser= or a dedicated User=")
    if "ReadWritePaths" not in keys:
        fail("systemd", "ReadWritePaths for the repository and the engine cache is missing")
    stop = float(keys.get("TimeoutStopSec", "90").rstrip("s"))
    if stop < float(config.get("request_timeout_s", 30.0)):
        fail("systemd", f"TimeoutStopSec {stop} is shorter than the drain (request_timeout_s)")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("check-deploy: systemd-analyze is not installed: the unit is not verified by systemd")
        return
    binary = ROOT / "target/debug/kestrel"
    if not binary.exists():
        sys.exit("check-deploy: target/debug/kestrel is missing: run `cargo build` first")
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "kestrel.service"
        p.write_text(unit.replace("/usr/local/bin/kestrel", str(binary)))
        r = subprocess.run([analyze, "verify", str(p)], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or out:
            fail("systemd", f"systemd-analyze verify: {out}")


def main() -> None:
    if sys.argv[1:] == ["--docker-build-debug"]:
        print(" ".join(a for a in docker_cargo_build() if a != "--release"))
        return
    os.chdir(ROOT)
    config = tomllib.loads((DEPLOY / "kestrel.toml").read_text())
    types = metric_types()
    check_grafana(types)
    check_rules(types)
    check_k8s(types, config)
    check_docker(config)
    check_systemd(config)
    if failures:
        print("check-deploy: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)
    print(f"check-deploy: ok ({len(types)} metrics; grafana, rules, k8s, Dockerfile, systemd)")


if __name__ == "__main__":
    main()
