"""Checks of ``deploy/``: Kubernetes manifests, kustomization, Dockerfile and its ignore file.

The manifests are validated offline with kubernetes-validate's bundled JSON schemas in strict
mode (unknown fields fail), against the oldest Kubernetes the manifests support and the newest
schemas the installed validator bundles. A kind the validator has no schema for fails too (its
command line only warns). Schema validation does not see cross-references (a Service selecting no
pod, a probe on a port that does not exist, an env var nobody reads), so those are checked here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
README = DEPLOY / "README.md"
KUSTOMIZATION = K8S / "kustomization.yaml"

MIN_KUBERNETES = "1.30"
KUBERNETES_VERSIONS = sorted({MIN_KUBERNETES, kv.major_minor(kv.latest_version())})

# The LBP_CDS_* settings a deployment may set. Each must be documented in deploy/README.md
# ("## Settings") and be a setting of lbp_cds.config.Settings.
DEPLOY_ENV_NAMES = frozenset(
    {
        "LBP_CDS_DATABASE_URL",
        "LBP_CDS_CLIENTS_FILE",
        "LBP_CDS_PUBLIC_BASE_URL",
        "LBP_CDS_CORS_ORIGINS",
        "LBP_CDS_WORKERS",
        "LBP_CDS_THREADS",
        "LBP_CDS_PORT",
        "LBP_CDS_HOST",
        "LBP_CDS_LOG_LEVEL",
        "LBP_CDS_FHIR_DEADLINE_SECONDS",
        "LBP_CDS_PARAMETERS_FILE",
        "LBP_CDS_SILENT_RULES",
        "LBP_CDS_KNOWLEDGE_DIR",
        "LBP_CDS_GRACEFUL_TIMEOUT_SECONDS",
        "LBP_CDS_FHIR_ALLOW_HTTP",
    }
)
# Never set by a deployment.
FORBIDDEN_ENV_NAMES = frozenset({"LBP_CDS_DEV"})

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
APP_PORT = 8080
ENTRYPOINT = ["lbp-cds", "serve", "--host", "0.0.0.0"]
RUNTIME_BASE = "python:3.11-slim"
# Used when the ConfigMap does not set LBP_CDS_GRACEFUL_TIMEOUT_SECONDS (the service's default).
DEFAULT_GRACEFUL_TIMEOUT_SECONDS = 20

# Compilers and headers that must not reach the runtime image.
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|cmake|build-essential|rustc|cargo|gfortran|pkg-config"
    r"|[\w.+-]+-dev|[\w.+-]+-devel)\b"
)
PACKAGE_INSTALL = re.compile(r"\b(apt-get|apt|apk|dnf|yum|microdnf)\b[^&;|]*\b(install|add)\b")


# --------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != KUSTOMIZATION.name)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_yaml_documents(path)]


def one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in all_objects() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc
        for _, doc in all_objects()
        if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name
    ]
    assert found, f"{kind}/{name} is referenced but not defined in deploy/k8s"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def app_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "expected a single container in the pod"
    return containers[0]


def container_env() -> dict[str, dict[str, Any]]:
    """Every variable the container gets: explicit env entries and envFrom ConfigMap/Secret keys,
    mapped to where it comes from."""
    container = app_container()
    env: dict[str, dict[str, Any]] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = named("ConfigMap", source["configMapRef"]["name"]).get("data", {})
            env.update({prefix + k: {"configMap": v} for k, v in data.items()})
        elif "secretRef" in source:
            secret = named("Secret", source["secretRef"]["name"])
            keys = {**secret.get("data", {}), **secret.get("stringData", {})}
            env.update({prefix + k: {"secret": v} for k, v in keys.items()})
        else:
            raise AssertionError(f"unknown envFrom source {source}")
    for entry in container.get("env", []):
        env[entry["name"]] = entry
    return env


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    text = str(value)
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", text)
    assert match, f"not a resource quantity: {value!r}"
    factor = {
        None: 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }[match.group(2)]
    return float(match.group(1)) * factor


# --------------------------------------------------------------------------- schema validation


def _validation_cases() -> list[Any]:
    cases = []
    for path in manifest_files():
        for index, doc in enumerate(load_yaml_documents(path)):
            label = f"{path.name}[{index}]:{doc.get('kind')}"
            for version in KUBERNETES_VERSIONS:
                cases.append(pytest.param(path, index, version, id=f"{label}@{version}"))
    return cases


def test_there_are_manifests() -> None:
    kinds = {doc["kind"] for _, doc in all_objects()}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
    } <= kinds


@pytest.mark.parametrize(("path", "index", "version"), _validation_cases())
def test_manifest_validates_strictly(path: Path, index: int, version: str) -> None:
    doc = load_yaml_documents(path)[index]
    problem = ""
    try:
        validated = kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        problem = (
            f"{path.name}: {doc.get('kind')} invalid for Kubernetes {e.version} "
            f"at {where}: {e.message}"
        )
    except kv.SchemaNotFoundError as e:
        problem = f"{path.name}: {e.message}"
    if problem:  # outside `except`, so the report is the message, not the schema dump
        pytest.fail(problem, pytrace=False)
    assert validated == version


def test_objects_are_namespace_agnostic_and_unique() -> None:
    seen: set[tuple[str, str]] = set()
    for path, doc in all_objects():
        meta = doc.get("metadata", {})
        assert "namespace" not in meta, f"{path.name}: set the namespace in an overlay"
        key = (doc["kind"], meta.get("name", ""))
        assert key not in seen, f"{path.name}: duplicate {key}"
        seen.add(key)


# --------------------------------------------------------------------------- kustomization


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml_documents(KUSTOMIZATION)[0]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization, "the base must stay namespace-agnostic"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization lists missing file {resource}"
    assert sorted(resources) == [p.name for p in manifest_files()]


def test_kustomization_image_is_the_project_version() -> None:
    kustomization = load_yaml_documents(KUSTOMIZATION)[0]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {image["name"]: image for image in kustomization.get("images", [])}
    image_name = app_container()["image"].split(":")[0]
    assert image_name in images, "kustomization `images` must set the container image"
    assert str(images[image_name].get("newTag")) == version


# --------------------------------------------------------------------------- Deployment


def test_probes_point_at_health_and_ready() -> None:
    container = app_container()
    port_names = {p.get("name") for p in container["ports"]}
    port_numbers = {p["containerPort"] for p in container["ports"]}
    expected = {
        "livenessProbe": HEALTH_PATH,
        "readinessProbe": READY_PATH,
        "startupProbe": HEALTH_PATH,
    }
    for probe_name, path in expected.items():
        probe = container.get(probe_name)
        assert probe, f"{probe_name} missing"
        assert probe["httpGet"]["path"] == path, f"{probe_name} must ask {path}"
        port = probe["httpGet"]["port"]
        assert port in port_names or port in port_numbers, f"{probe_name} port {port} unknown"
    assert APP_PORT in port_numbers


def test_pod_runs_as_non_root_read_only() -> None:
    spec = pod_spec()
    pod_sc = spec.get("securityContext", {})
    sc = app_container().get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert isinstance(uid, int) and uid > 0
    assert uid == dockerfile_uid(), "runAsUser must match the Dockerfile USER"
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert not sc.get("capabilities", {}).get("add")
    assert spec.get("automountServiceAccountToken") is False
    assert spec.get("enableServiceLinks") is False, (
        "service links inject LBP_CDS_PORT=tcp://... for the Service named lbp-cds"
    )


def test_writable_tmp_for_gunicorn() -> None:
    mounts = {m["mountPath"]: m["name"] for m in app_container().get("volumeMounts", [])}
    assert "/tmp" in mounts, "read-only root file system: gunicorn needs a writable /tmp"
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_resources_have_requests_and_limits() -> None:
    resources = app_container().get("resources", {})
    for kind in ("cpu", "memory"):
        request = resources.get("requests", {}).get(kind)
        limit = resources.get("limits", {}).get(kind)
        assert request is not None and limit is not None, f"{kind} request and limit required"
        assert 0 < quantity(request) <= quantity(limit), f"{kind}: request must be <= limit"


def test_rolling_update_keeps_capacity_and_autoscaler_owns_replicas() -> None:
    deployment = one("Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] in (0, "0%")
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    replicas = deployment["spec"].get("replicas")
    assert replicas is None or replicas == hpa["spec"]["minReplicas"]


def test_termination_grace_covers_prestop_and_graceful_timeout() -> None:
    pre_stop = app_container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = int(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", "preStop must sleep while endpoints are removed"
        sleep = int(command[1])
    assert sleep >= 3
    env = container_env()
    graceful = DEFAULT_GRACEFUL_TIMEOUT_SECONDS
    if "LBP_CDS_GRACEFUL_TIMEOUT_SECONDS" in env:
        graceful = int(env["LBP_CDS_GRACEFUL_TIMEOUT_SECONDS"]["configMap"])
    assert pod_spec()["terminationGracePeriodSeconds"] > sleep + graceful


def test_prometheus_annotations() -> None:
    annotations = one("Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == METRICS_PATH
    ports = {p["containerPort"] for p in app_container()["ports"]}
    assert int(annotations["prometheus.io/port"]) in ports


# --------------------------------------------------------------------------- cross-references


def _selects_pods(selector: dict[str, str]) -> bool:
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_selectors_select_the_pods() -> None:
    deployment = one("Deployment")
    assert _selects_pods(deployment["spec"]["selector"]["matchLabels"])
    assert _selects_pods(one("Service")["spec"]["selector"])
    assert _selects_pods(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    spread = pod_spec().get("topologySpreadConstraints", [])
    for constraint in spread:
        assert _selects_pods(constraint["labelSelector"]["matchLabels"])


def test_service_routes_80_to_the_container_port() -> None:
    service = one("Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    container_ports = {p.get("name"): p["containerPort"] for p in app_container()["ports"]}
    target = port["targetPort"]
    assert container_ports.get(target, target) == APP_PORT


def test_autoscaler_targets_the_deployment_on_cpu() -> None:
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    assert "cpu" in resources


def test_volumes_and_references_resolve() -> None:
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in app_container().get("volumeMounts", []):
        assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
    for volume in volumes.values():
        if "secret" in volume:
            secret = named("Secret", volume["secret"]["secretName"])
            keys = {**secret.get("data", {}), **secret.get("stringData", {})}
            for item in volume["secret"].get("items", []):
                assert item["key"] in keys, f"Secret has no key {item['key']}"
        if "configMap" in volume:
            config_map = named("ConfigMap", volume["configMap"]["name"])
            for item in volume["configMap"].get("items", []):
                assert item["key"] in config_map.get("data", {})
    for entry in app_container().get("env", []):
        ref = entry.get("valueFrom", {})
        if "secretKeyRef" in ref:
            secret = named("Secret", ref["secretKeyRef"]["name"])
            keys = {**secret.get("data", {}), **secret.get("stringData", {})}
            assert ref["secretKeyRef"]["key"] in keys, f"{entry['name']}: no such Secret key"
        if "configMapKeyRef" in ref:
            config_map = named("ConfigMap", ref["configMapKeyRef"]["name"])
            assert ref["configMapKeyRef"]["key"] in config_map.get("data", {})


def test_clients_file_is_mounted_from_the_secret() -> None:
    env = container_env()
    clients_file = PurePosixPath(env["LBP_CDS_CLIENTS_FILE"]["configMap"])
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = [
        m
        for m in app_container()["volumeMounts"]
        if PurePosixPath(m["mountPath"]) == clients_file.parent
    ]
    assert mounts, f"nothing is mounted at {clients_file.parent}"
    mount = mounts[0]
    assert mount.get("readOnly") is True
    secret_volume = volumes[mount["name"]]["secret"]
    paths = {item["path"]: item["key"] for item in secret_volume.get("items", [])}
    assert clients_file.name in paths, f"the Secret volume does not provide {clients_file.name}"
    secret = named("Secret", secret_volume["secretName"])
    clients = yaml.safe_load(secret["stringData"][paths[clients_file.name]])
    assert isinstance(clients, dict), "the clients placeholder must be a YAML mapping"


def test_clients_placeholder_is_a_valid_clients_file(tmp_path: Path) -> None:
    """The placeholder shows operators the real format: the service's own loader accepts it."""
    from lbp_cds import auth
    secret = one("Secret")
    path = tmp_path / "clients.yaml"
    path.write_text(secret["stringData"]["clients.yaml"], encoding="utf-8")
    clients = auth.load_clients(path)
    assert clients and all(".invalid" in c.iss for c in clients), "keep placeholders unroutable"


def test_database_url_comes_from_the_secret_and_is_postgresql() -> None:
    entry = container_env()["LBP_CDS_DATABASE_URL"]
    ref = entry.get("valueFrom", {}).get("secretKeyRef")
    assert ref, "the database URL holds a password: take it from a Secret"
    url = named("Secret", ref["name"])["stringData"][ref["key"]]
    assert url.startswith("postgresql+psycopg://"), "replicas must share PostgreSQL"


# --------------------------------------------------------------------------- settings


def _deployment_env_names() -> set[str]:
    names = {n for n in container_env() if n.startswith("LBP_CDS_")}
    names |= {n for n in dockerfile_env(final_stage()) if n.startswith("LBP_CDS_")}
    return names


def _readme_settings_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Settings\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "deploy/README.md needs a '## Settings' section"
    return match.group(1)


def test_deployment_sets_only_known_settings() -> None:
    names = _deployment_env_names()
    assert names, "found no LBP_CDS_ settings"
    unknown = names - DEPLOY_ENV_NAMES
    assert not unknown, f"not in DEPLOY_ENV_NAMES (document them first): {sorted(unknown)}"
    forbidden = names & FORBIDDEN_ENV_NAMES
    assert not forbidden, f"must never be set in a deployment: {sorted(forbidden)}"


def test_settings_are_documented_in_the_readme() -> None:
    section = _readme_settings_section()
    documented = set(re.findall(r"`(LBP_CDS_[A-Z0-9_]+)`", section))
    missing = DEPLOY_ENV_NAMES - documented
    assert not missing, f"deploy/README.md '## Settings' does not list {sorted(missing)}"
    assert documented - FORBIDDEN_ENV_NAMES <= DEPLOY_ENV_NAMES


def test_settings_exist_in_the_service() -> None:
    from lbp_cds import config
    known = {config.PREFIX + f.name.upper() for f in dataclasses.fields(config.Settings)}
    unknown = DEPLOY_ENV_NAMES - known
    assert not unknown, f"lbp_cds.config.Settings has no {sorted(unknown)}"


def test_config_values_parse_as_the_service_expects() -> None:
    from lbp_cds import config
    environ = {
        name: source["configMap"]
        for name, source in container_env().items()
        if "configMap" in source
    }
    environ["LBP_CDS_DATABASE_URL"] = "postgresql+psycopg://u:p@db/x"
    settings = config.Settings.from_env(environ)
    assert settings.dev is False
    assert settings.port == APP_PORT


# --------------------------------------------------------------------------- Dockerfile


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Split a Dockerfile into global ARG defaults and stages (continuations joined, comments
    dropped, as the Dockerfile frontend does)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base, name, []))
        elif not stages:
            assert instruction.keyword == "ARG", "only ARG may come before the first FROM"
            key, _, default = instruction.args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def dockerfile_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.args)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def dockerfile_uid() -> int:
    users = final_stage().all("USER")
    assert users, "the runtime stage must set USER"
    user = users[-1].args.split(":")[0]
    assert user.isdigit(), "USER must be numeric, so runAsNonRoot can verify it"
    return int(user)


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build the wheel in a separate stage"
    final = stages[-1]
    assert final.base.startswith(RUNTIME_BASE), f"runtime stage must be {RUNTIME_BASE}"
    earlier = {s.name for s in stages[:-1] if s.name}
    assert final.base not in earlier, "the runtime stage must not start from the builder"
    copies_from_builder = [
        i for i in final.instructions if i.keyword in ("COPY", "RUN") and "from=" in i.args
    ]
    assert copies_from_builder, "the runtime stage must take the wheels from the build stage"


def test_dockerfile_runs_as_non_root() -> None:
    assert dockerfile_uid() != 0
    user = final_stage().all("USER")[-1]
    later = [i for i in final_stage().instructions if i.line > user.line and i.keyword == "RUN"]
    assert not later, "RUN after USER would not run as root: keep USER after the installs"


def test_dockerfile_healthcheck_asks_healthz() -> None:
    checks = final_stage().all("HEALTHCHECK")
    assert checks, "HEALTHCHECK missing"
    args = checks[-1].args
    assert not args.upper().startswith("NONE")
    assert HEALTH_PATH in args
    assert "curl" not in args and "wget" not in args, "the slim image has neither"
    command = args[args.index("CMD") + 3 :].strip()
    if command.startswith("["):
        # Docker silently runs invalid JSON as a shell command: that check would always fail.
        exec_form = json.loads(command)
        assert exec_form[0] in ("python", "python3"), "check with Python (no curl in slim)"


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    for instruction in final_stage().all("RUN"):
        command = instruction.args
        for install in PACKAGE_INSTALL.finditer(command):
            tail = command[install.start() :]
            tail = re.split(r"&&|;|\|\|", tail)[0]
            assert not BUILD_TOOLS.search(tail), (
                f"line {instruction.line}: build tools in the runtime stage: {tail}"
            )
        assert not re.search(r"\bpip\s+wheel\b|-m\s+build\b|\bhatch\b", command), (
            f"line {instruction.line}: build the wheel in the build stage"
        )
        if re.search(r"\bpip\s+install\b", command):
            assert "--no-index" in command, (
                f"line {instruction.line}: install only the prebuilt wheels (--no-index)"
            )
    for copy in final_stage().all("COPY"):
        assert "--from=" in copy.args, f"line {copy.line}: runtime stage copies sources"


def test_dockerfile_entrypoint_port_and_volume() -> None:
    final = final_stage()
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint.args) == ENTRYPOINT
    exposed = {p.split("/")[0] for i in final.all("EXPOSE") for p in i.args.split()}
    assert str(APP_PORT) in exposed
    env = dockerfile_env(final)
    assert env.get("LBP_CDS_PORT", str(APP_PORT)) == str(APP_PORT)
    volumes: set[str] = set()
    for instruction in final.all("VOLUME"):
        args = instruction.args
        volumes |= set(json.loads(args) if args.startswith("[") else args.split())
    database = env["LBP_CDS_DATABASE_URL"]
    assert database.startswith("sqlite:////"), "default SQLite database with an absolute path"
    database_path = PurePosixPath(database.removeprefix("sqlite:///"))
    assert any(PurePosixPath(v) in database_path.parents for v in volumes), (
        "the SQLite default must live in a declared VOLUME"
    )
    workdir = PurePosixPath(final.all("WORKDIR")[-1].args)
    assert any(
        PurePosixPath(v) == workdir or PurePosixPath(v) in workdir.parents for v in volumes
    ), "relative paths must land in the volume"


def _wheel_sources() -> set[str]:
    """Top-level paths the wheel is built from, read from pyproject.toml."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    paths = {"pyproject.toml", pyproject["project"]["readme"]}
    paths |= {PurePosixPath(p).parts[0] for p in wheel.get("packages", [])}
    paths |= {PurePosixPath(p).parts[0] for p in wheel.get("force-include", {})}
    return paths


def test_dockerfile_build_stage_copies_what_the_wheel_needs() -> None:
    build = dockerfile_stages()[0]
    copied: set[str] = set()
    for copy in build.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        copied |= {w.rstrip("/") for w in words[:-1]}
    missing = _wheel_sources() - copied
    assert not missing, f"the build stage does not COPY {sorted(missing)}"


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory matches
    everything below it; `**/` matches zero or more directories."""
    excluded = False
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip().strip("/")
        variants = {pattern}
        if pattern.startswith("**/"):
            variants.add(pattern[3:])
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_the_wheel_sources() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in _wheel_sources():
        probe = source if "." in source else f"{source}/some/file.yaml"
        assert not _dockerignore_excludes(patterns, probe), f"{probe} would not be sent"
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_deploy.py",
        "bench/x.json",
        "src/lbp_cds/__pycache__/config.cpython-311.pyc",
        "lbp-cds.sqlite3",
    ):
        assert _dockerignore_excludes(patterns, path), f"{path} would be sent to the builder"


# --------------------------------------------------------------------------- retention job


def test_retention_job_runs_a_purge_the_cli_accepts_on_the_shared_database() -> None:
    from lbp_cds.cli import build_parser

    job = one("CronJob")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == app_container()["image"]
    assert container["command"] == ["lbp-cds"], "must replace the image's `serve` entrypoint"
    args = build_parser().parse_args(container["args"])  # exits (fails) on an unknown option
    assert args.func.__name__ == "cmd_purge" and args.older_than_days >= 365
    assert not args.dry_run
    env = {e["name"]: e for e in container["env"]}
    assert env["LBP_CDS_DATABASE_URL"] == container_env()["LBP_CDS_DATABASE_URL"]
    sc, pod_sc = container["securityContext"], pod["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert pod_sc["runAsUser"] == dockerfile_uid() and pod_sc["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # Its pods are not web pods: no Service, PDB or autoscaler may count them.
    labels = job["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    web = one("Service")["spec"]["selector"]
    assert any(labels.get(k) != v for k, v in web.items())
