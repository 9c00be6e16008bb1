"""Static checks of the deployment configs under infra/: Dockerfiles, KubeRay and the AWS launcher.

Every rule is a small function that returns a list of problems (empty when the document is
fine). The tests run the rules on every real file under infra/ (one test id per file), and on
deliberately broken documents to prove that each rule catches what it is meant to catch.
"""

from __future__ import annotations

import base64
import copy
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import fundus_batch

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

PLACEHOLDER = "REPLACE_ME"
RAY_VERSION = importlib.metadata.version("ray")
RAY_MAJOR_MINOR = ".".join(RAY_VERSION.split(".")[:2])
KUBERAY_KINDS = frozenset({"RayCluster", "RayJob"})
GPU_RESOURCE = "nvidia.com/gpu"
# Job scripts whose RayJob must bring a GPU worker group, and whose config must ask for CUDA.
GPU_JOB_SCRIPTS = frozenset({"jobs/enhance_bucket.py"})
# `ray job stop` SIGKILLs the driver this many seconds after SIGTERM unless the job's runtime env
# sets RAY_JOB_STOP_WAIT_TIME_S (ray/dashboard/modules/job/job_supervisor.py); the job needs
# longer to release OUT's lease and copy its Ray log to OUT/logs/.
STOP_WAIT_VAR = "RAY_JOB_STOP_WAIT_TIME_S"
MIN_STOP_WAIT_S = 30
# Images built from infra/docker/: their tags are "<package version>-cpu" or "<version>-cuXYZ".
OWN_IMAGE_NAME = "fundus-batch"

EXPECTED_FILES = (
    "infra/docker/Dockerfile.cpu",
    "infra/docker/Dockerfile.cuda",
    "infra/docker/README.md",
    "infra/kuberay/raycluster.yaml",
    "infra/kuberay/rayjob-regenerate-pairs.yaml",
    "infra/kuberay/rayjob-enhance-bucket.yaml",
    "infra/kuberay/secret.example.yaml",
    "infra/kuberay/README.md",
    "infra/aws/cluster.yaml",
    "infra/aws/README.md",
    "infra/test_cluster.sh",
)

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
SECRET_TEMPLATE = INFRA / "kuberay" / "secret.example.yaml"
KUBERAY_FILES = sorted(
    p for p in (INFRA / "kuberay").glob("*.yaml") if not p.name.endswith(".example.yaml")
)
AWS_FILES = sorted((INFRA / "aws").glob("*.yaml"))
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile*"))
TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


PROJECT_VERSION = fundus_batch.__version__


def load_docs(path: Path) -> list[Any]:
    """All non-empty YAML documents in a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ---------------------------------------------------------------------------------------------
# Inline secrets (every YAML under infra/)

AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
PRIVATE_KEY_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
SECRET_KEY_NAME = re.compile(
    r"(?:^|_)(?:password|passwd|secret|secret_key|secret_access_key|access_key_id|session_token"
    r"|token|access_token|auth_token|api_key|account_key|client_secret|private_key|sas_token"
    r"|connection_string)$"
)
SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|password|passwd|api_key|account_key"
    r"|client_secret)\s*[:=]\s*['\"]?([^\s'\",}]+)"
)


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).replace("-", "_").lower()


def is_placeholder(value: Any) -> bool:
    """True for values that are clearly not a credential: empty, REPLACE_ME, $VAR, <hint>."""
    if value is None or isinstance(value, bool):
        return True
    text = str(value).strip()
    return (
        text == ""
        or PLACEHOLDER in text
        or text.startswith("$")
        or (text.startswith("<") and text.endswith(">"))
    )


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (location, key, value) for every mapping entry and list item, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            loc = f"{where}.{key}" if where else str(key)
            yield loc, key, value
            yield from _walk(value, loc)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            loc = f"{where}[{i}]"
            yield loc, None, value
            yield from _walk(value, loc)


def find_inline_secrets(doc: Any) -> list[str]:
    """Credentials written into a config instead of referenced from a secret store."""
    problems: list[str] = []
    for where, key, value in _walk(doc):
        if isinstance(key, str) and key.endswith("YAML") and isinstance(value, str):
            # Embedded YAML (RayJob.runtimeEnvYAML) hides env_vars from the walk above.
            try:
                embedded = yaml.safe_load(value)
            except yaml.YAMLError:
                problems.append(f"{where}: embedded YAML does not parse")
            else:
                problems += [f"{where} -> {p}" for p in find_inline_secrets(embedded)]
        if isinstance(value, dict) and "name" in value and "value" in value:
            # Kubernetes env entry: credentials must come from valueFrom.secretKeyRef.
            name = str(value["name"])
            if SECRET_KEY_NAME.search(_snake(name)) and not is_placeholder(value["value"]):
                problems.append(
                    f"{where}: env var {name} has a literal value; use valueFrom.secretKeyRef"
                )
        if isinstance(value, dict | list):
            continue
        if (
            isinstance(key, str)
            and SECRET_KEY_NAME.search(_snake(key))
            and not is_placeholder(value)
        ):
            problems.append(f"{where}: credential-named key {key!r} holds a literal value")
        if isinstance(value, str):
            if AWS_KEY_ID.search(value):
                problems.append(f"{where}: looks like an AWS access key id")
            if PRIVATE_KEY_BLOCK.search(value):
                problems.append(f"{where}: contains a private key")
            for match in SECRET_ASSIGNMENT.finditer(value):
                if not is_placeholder(match.group(2)):
                    problems.append(f"{where}: inline {match.group(1)} assignment")
    return problems


def check_secret_object(doc: Any, file_name: str) -> list[str]:
    """A Kubernetes Secret under infra/ is a template: example file, REPLACE_ME values only."""
    if not isinstance(doc, dict) or doc.get("kind") != "Secret":
        return []
    problems: list[str] = []
    if not file_name.endswith(".example.yaml"):
        problems.append(f"Secret in {file_name}: Secrets may only live in *.example.yaml templates")
    for key, value in (doc.get("stringData") or {}).items():
        if value != PLACEHOLDER:
            problems.append(f"Secret stringData.{key}: only the placeholder {PLACEHOLDER} allowed")
    for key, value in (doc.get("data") or {}).items():
        try:
            decoded = base64.b64decode(str(value), validate=True).decode()
        except ValueError:
            decoded = None
        if decoded != PLACEHOLDER:
            problems.append(f"Secret data.{key}: only base64 of {PLACEHOLDER} allowed")
    return problems


# ---------------------------------------------------------------------------------------------
# Images


def image_tag(image: str) -> str | None:
    """The tag (or digest) of an image reference; None when the reference has neither."""
    if "@" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def check_image(image: Any, where: str, *, gpu: bool) -> list[str]:
    """Pinned to a tag (never latest); our own images carry the package version and flavour."""
    if not isinstance(image, str) or not image:
        return [f"{where}: no image"]
    tag = image_tag(image)
    if tag is None:
        return [f"{where}: image {image} is not pinned to a tag"]
    if tag == "latest":
        return [f"{where}: image {image} uses :latest"]
    repo_name = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    if repo_name != OWN_IMAGE_NAME or tag.startswith("sha256:"):
        return []
    flavour = r"cu\d+" if gpu else "cpu"
    if not re.fullmatch(rf"{re.escape(PROJECT_VERSION)}-{flavour}(-[\w.]+)?", tag):
        kind = "GPU (-cuXYZ)" if gpu else "CPU (-cpu)"
        return [f"{where}: image {image} should be the {kind} image tagged {PROJECT_VERSION}-..."]
    return []


# ---------------------------------------------------------------------------------------------
# KubeRay


def _quantity_int(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def check_resources(resources: Any, where: str) -> list[str]:
    """requests and limits, each with cpu and memory; GPU requests equal to limits."""
    if not isinstance(resources, dict):
        return [f"{where}: no resources"]
    problems = []
    for section in ("requests", "limits"):
        block = resources.get(section)
        if not isinstance(block, dict):
            problems.append(f"{where}: no resources.{section}")
            continue
        problems += [
            f"{where}: resources.{section} lacks {name}"
            for name in ("cpu", "memory")
            if name not in block
        ]
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    if GPU_RESOURCE in requests and requests.get(GPU_RESOURCE) != limits.get(GPU_RESOURCE):
        problems.append(f"{where}: {GPU_RESOURCE} requests must equal limits")
    return problems


def _pod_containers(group: dict[str, Any]) -> list[Any]:
    template = group.get("template") or {}
    return ((template.get("spec") or {}).get("containers")) or []


def group_gpus(group: dict[str, Any]) -> int:
    """GPUs per pod of a head or worker group (from the container limits)."""
    total = 0
    for container in _pod_containers(group):
        limits = ((container or {}).get("resources") or {}).get("limits") or {}
        total += _quantity_int(limits.get(GPU_RESOURCE, 0)) or 0
    return total


def check_group(group: Any, where: str, *, worker: bool) -> list[str]:
    """One head or worker group: start params, containers, replica bounds, GPU wiring."""
    if not isinstance(group, dict):
        return [f"{where}: not a mapping"]
    problems: list[str] = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        problems.append(f"{where}: rayStartParams missing")
        params = {}
    problems += [
        f"{where}: rayStartParams.{key} must be a string (got {value!r})"
        for key, value in params.items()
        if not isinstance(value, str)
    ]
    containers = _pod_containers(group)
    if not containers:
        problems.append(f"{where}: no containers in template.spec")
    gpus = group_gpus(group)
    for i, container in enumerate(containers):
        loc = f"{where}.containers[{i}]"
        container = container or {}
        problems += check_image(container.get("image"), loc, gpu=gpus > 0)
        problems += check_resources(container.get("resources"), loc)
    if not worker:
        return problems
    name = str(group.get("groupName", ""))
    if not name:
        problems.append(f"{where}: no groupName")
    bounds = {key: group.get(key) for key in ("minReplicas", "replicas", "maxReplicas")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in bounds.values()):
        problems.append(f"{where}: minReplicas, replicas and maxReplicas must all be integers")
    elif not 0 <= bounds["minReplicas"] <= bounds["replicas"] <= bounds["maxReplicas"]:
        problems.append(f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas, got {bounds}")
    elif bounds["maxReplicas"] < 1:
        problems.append(f"{where}: maxReplicas must be at least 1")
    if "gpu" in name.lower() and gpus < 1:
        problems.append(f"{where}: GPU group {name} requests no {GPU_RESOURCE} in its limits")
    if gpus > 0 and params.get("num-gpus") != str(gpus):
        problems.append(f"{where}: rayStartParams.num-gpus must be {str(gpus)!r}")
    return problems


def check_cluster_spec(spec: Any, where: str) -> list[str]:
    """A RayClusterSpec: Ray version, autoscaling and every group."""
    if not isinstance(spec, dict):
        return [f"{where}: missing"]
    problems: list[str] = []
    version = str(spec.get("rayVersion", ""))
    if ".".join(version.split(".")[:2]) != RAY_MAJOR_MINOR:
        problems.append(
            f"{where}.rayVersion {version!r} does not match installed Ray {RAY_VERSION}"
        )
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling must be true")
    autoscaler = spec.get("autoscalerOptions") or {}
    if "resources" in autoscaler:
        problems += check_resources(autoscaler["resources"], f"{where}.autoscalerOptions")
    problems += check_group(spec.get("headGroupSpec"), f"{where}.headGroupSpec", worker=False)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return [*problems, f"{where}.workerGroupSpecs: at least one worker group needed"]
    for i, group in enumerate(groups):
        problems += check_group(group, f"{where}.workerGroupSpecs[{i}]", worker=True)
    return problems


def _worker_groups(spec: Any) -> list[dict[str, Any]]:
    groups = (spec or {}).get("workerGroupSpecs") if isinstance(spec, dict) else None
    return [g for g in groups or [] if isinstance(g, dict)]


def parse_entrypoint(entrypoint: str) -> tuple[str | None, str | None, list[str]]:
    """(script, config, problems) of `python <script> ... --config <config>`."""
    try:
        tokens = shlex.split(entrypoint)
    except ValueError as exc:
        return None, None, [f"entrypoint does not parse: {exc}"]
    if len(tokens) < 2 or tokens[0] not in {"python", "python3"} or tokens[1].startswith("-"):
        return None, None, [f"entrypoint {entrypoint!r} is not `python <script> ...`"]
    config = None
    for i, token in enumerate(tokens[2:], start=2):
        if token == "--config" and i + 1 < len(tokens):
            config = tokens[i + 1]
        elif token.startswith("--config="):
            config = token.split("=", 1)[1]
    if config is None:
        return tokens[1], None, [f"entrypoint {entrypoint!r} has no --config <path>"]
    return tokens[1], config, []


def check_rayjob_spec(spec: dict[str, Any], repo: Path) -> list[str]:
    """Entrypoint files exist, the cluster is torn down, the runtime env can reach the files."""
    problems: list[str] = []
    script, config, parse_problems = parse_entrypoint(str(spec.get("entrypoint", "")))
    problems += [f"spec.{p}" for p in parse_problems]
    if script is not None and not (repo / script).is_file():
        problems.append(f"spec.entrypoint: script {script} does not exist in the repository")
    if config is not None and not (repo / config).is_file():
        problems.append(f"spec.entrypoint: --config file {config} does not exist in the repository")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        problems.append("spec.ttlSecondsAfterFinished must be set to a non-negative integer")
    runtime_env: Any = {}
    if "runtimeEnvYAML" in spec:
        try:
            runtime_env = yaml.safe_load(str(spec["runtimeEnvYAML"])) or {}
        except yaml.YAMLError as exc:
            problems.append(f"spec.runtimeEnvYAML does not parse: {exc}")
        if not isinstance(runtime_env, dict):
            problems.append("spec.runtimeEnvYAML must be a mapping")
            runtime_env = {}
    working_dir = runtime_env.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        # Only the submitter pod of K8sJobMode can upload a local folder.
        if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            problems.append("spec.submissionMode must be K8sJobMode for a local working_dir")
        if not working_dir.startswith("/"):
            problems.append("spec.runtimeEnvYAML working_dir must be an absolute path in the image")
    problems += [f"spec.runtimeEnvYAML {p}" for p in check_stop_wait(runtime_env)]
    cluster = spec.get("rayClusterSpec")
    if script in GPU_JOB_SCRIPTS:
        if not any(group_gpus(g) for g in _worker_groups(cluster)):
            problems.append(
                f"spec.rayClusterSpec: {script} needs a worker group with {GPU_RESOURCE}"
            )
        if config is not None and (repo / config).is_file():
            problems += [f"spec.entrypoint: {p}" for p in check_gpu_job_config(repo / config)]
    return problems


def check_stop_wait(runtime_env: Any) -> list[str]:
    """The job's runtime env gives a stopped driver time to clean up (RAY_JOB_STOP_WAIT_TIME_S)."""
    env_vars = (runtime_env or {}).get("env_vars") if isinstance(runtime_env, dict) else None
    value = (env_vars or {}).get(STOP_WAIT_VAR) if isinstance(env_vars, dict) else None
    if not isinstance(value, str) or not value.isdigit():
        return [f"env_vars must set {STOP_WAIT_VAR} to a quoted number of seconds, got {value!r}"]
    if int(value) < MIN_STOP_WAIT_S:
        return [f"env_vars.{STOP_WAIT_VAR} {value} s is under {MIN_STOP_WAIT_S} s"]
    return []


def check_gpu_job_config(path: Path) -> list[str]:
    """A GPU job's config asks for CUDA: with `auto` a run started while the GPU group is at
    zero replicas plans CPU actors and never asks for a GPU (ray_adapter.plan_pools)."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        return [f"{path.name} does not parse: {exc}"]
    device = ((cfg.get("enhance") or {}) if isinstance(cfg, dict) else {}).get("device", "auto")
    if device != "cuda":
        return [f"GPU job config {path.name} must set enhance.device: cuda, got {device!r}"]
    return []


def check_kuberay_doc(doc: Any, repo: Path = REPO) -> list[str]:
    """A RayCluster or RayJob document."""
    if not isinstance(doc, dict):
        return ["document is not a mapping"]
    problems: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    kind = doc.get("kind")
    if kind not in KUBERAY_KINDS:
        return [*problems, f"kind must be one of {sorted(KUBERAY_KINDS)}, got {kind!r}"]
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if kind == "RayCluster":
        problems += check_cluster_spec(spec, "spec")
        groups = _worker_groups(spec)
        if not any(group_gpus(g) for g in groups):
            problems.append(f"spec: a RayCluster needs a GPU worker group ({GPU_RESOURCE})")
        if not any(group_gpus(g) == 0 for g in groups):
            problems.append("spec: a RayCluster needs a CPU worker group")
    else:
        problems += check_cluster_spec(spec.get("rayClusterSpec"), "spec.rayClusterSpec")
        problems += check_rayjob_spec(spec, repo)
    return problems


# ---------------------------------------------------------------------------------------------
# AWS cluster launcher


def _ray_autoscaler_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None, "ray is not installed"
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


def check_aws_cluster(cfg: Any) -> list[str]:
    """Ray's own schema plus node types, worker bounds, images and keyless credentials."""
    if not isinstance(cfg, dict):
        return ["document is not a mapping"]
    schema = _ray_autoscaler_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [
        f"schema: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(cfg)
    ]
    provider = cfg.get("provider") or {}
    if provider.get("type") != "aws" or not provider.get("region"):
        problems.append("provider must be type aws with a region")
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type {head!r} is not in available_node_types")
    cluster_max = cfg.get("max_workers")
    if not isinstance(cluster_max, int) or cluster_max < 1:
        problems.append("max_workers (all workers together) must be a positive integer")
        cluster_max = None
    docker = cfg.get("docker") or {}
    problems += check_image(docker.get("head_image") or docker.get("image"), "docker", gpu=False)
    workers = {name: t for name, t in types.items() if name != head and isinstance(t, dict)}
    has_cpu = has_gpu = False
    min_total = 0
    for name, node_type in types.items():
        if not isinstance(node_type, dict):
            continue
        where = f"available_node_types.{name}"
        node_config = node_type.get("node_config") or {}
        if "IamInstanceProfile" not in node_config:
            problems.append(f"{where}: no IamInstanceProfile (credentials come from the profile)")
        resources = node_type.get("resources") or {}
        gpus = resources.get("GPU", 0)
        if name not in workers:
            continue
        has_gpu = has_gpu or gpus >= 1
        has_cpu = has_cpu or (gpus == 0 and resources.get("CPU", 0) > 0)
        low, high = node_type.get("min_workers"), node_type.get("max_workers")
        if not isinstance(low, int) or not isinstance(high, int):
            problems.append(f"{where}: min_workers and max_workers must be set")
        elif not 0 <= low <= high or (cluster_max is not None and high > cluster_max):
            problems.append(f"{where}: need 0 <= min_workers <= max_workers <= {cluster_max}")
        else:
            min_total += low
        node_docker = node_type.get("docker") or {}
        image = node_docker.get("worker_image") or docker.get("worker_image", docker.get("image"))
        problems += check_image(image, f"{where}.docker", gpu=gpus >= 1)
        # The autoscaler merges a node type's docker section over the global one (dict update)
        # and starts the container with run_options + worker_run_options.
        options = list(docker.get("run_options") or []) + list(
            node_docker.get("worker_run_options", docker.get("worker_run_options")) or []
        )
        if gpus >= 1 and not any(str(o).split()[:1] == ["--gpus"] for o in options):
            problems.append(
                f"{where}.docker: a GPU node type needs `--gpus all` in worker_run_options (Ray "
                "adds --runtime=nvidia only when docker info lists nvidia-container-runtime)"
            )
    if cluster_max is not None and min_total > cluster_max:
        problems.append("the min_workers of all worker types exceed max_workers")
    if not has_cpu:
        problems.append("available_node_types: no CPU worker type (CPU > 0, no GPU)")
    if not has_gpu:
        problems.append("available_node_types: no GPU worker type (resources.GPU >= 1)")
    for src, dst in (cfg.get("file_mounts") or {}).items():
        if any(marker in f"{src} {dst}" for marker in (".aws", "credentials")):
            problems.append(f"file_mounts: {src} looks like a credentials file; use a profile")
    head_cmds = " ".join(cfg.get("head_start_ray_commands") or [])
    if "--autoscaling-config" not in head_cmds:
        problems.append("head_start_ray_commands must start Ray with --autoscaling-config")
    if "$RAY_HEAD_IP" not in " ".join(cfg.get("worker_start_ray_commands") or []):
        problems.append("worker_start_ray_commands must join $RAY_HEAD_IP")
    return problems


# ---------------------------------------------------------------------------------------------
# Dockerfiles

RAY_BASE_IMAGE = re.compile(r"^rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-(cpu|cu\d+)$")
# A Debian image with (or without) Python and no Ray: Ray then comes from pip. Only for images
# that make a cluster of their own (the local debootstrap base of infra/test_cluster.sh is passed
# as a build argument); the defaults of both Dockerfiles are Ray images (check_image_pair).
PYTHON_BASE_IMAGE = re.compile(r"^python:3\.(\d+)(?:\.\d+)?-(?:slim-)?(bookworm|trixie)$")
# The builds pin and assert Ray to exactly ARG RAY_VERSION and check Python against ARG
# PYTHON_VERSION (Ray 2.60 compares Ray and Python x.y.z between nodes).
RAY_PIN = re.compile(r"\bray(?:\[[\w,]+\])?==\$\{?RAY_VERSION\}?")
RAY_EXACT_ASSERT = "assert ray.__version__ == "
PYTHON_VERSION_ARG = re.compile(r"^3\.(\d+)(?:\.\d+)?$")


def dockerfile_python(text: str) -> str | None:
    """The Python of a Dockerfile's base image as "3NN" (e.g. "311"), None when unknown."""
    base = dockerfile_base(text)
    if match := RAY_BASE_IMAGE.match(base):
        return match.group(2)
    if match := PYTHON_BASE_IMAGE.match(base):
        return f"3{match.group(1)}"
    return None


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        instruction, _, args = (buffer + line).partition(" ")
        instructions.append((instruction.upper(), args.strip()))
        buffer = ""
    return instructions


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Default values of ARG instructions."""
    defaults: dict[str, str] = {}
    for instruction, args in instructions:
        if instruction == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip("\"'")
    return defaults


def dockerfile_base(text: str) -> str:
    """The FROM image with ARG defaults substituted."""
    instructions = dockerfile_instructions(text)
    defaults = dockerfile_args(instructions)
    bases = [args.split()[0] for instruction, args in instructions if instruction == "FROM"]
    if not bases:
        return ""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), ""), bases[-1]
    )


def _copy_sources(args: str) -> tuple[list[str], str]:
    tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
    tokens = [t for t in tokens if not t.startswith("--")]
    return tokens[:-1], tokens[-1] if tokens else ""


def check_versions(text: str) -> list[str]:
    """Ray pinned and asserted to exactly ARG RAY_VERSION (the installed Ray; a Ray base image of
    that version), Python checked against ARG PYTHON_VERSION (the base's minor version)."""
    instructions = dockerfile_instructions(text)
    args = dockerfile_args(instructions)
    runs = [a for instruction, a in instructions if instruction == "RUN"]
    problems: list[str] = []
    ray_version = args.get("RAY_VERSION")
    if ray_version != RAY_VERSION:
        problems.append(f"ARG RAY_VERSION={ray_version} is not the installed Ray {RAY_VERSION}")
    base = dockerfile_base(text)
    if (match := RAY_BASE_IMAGE.match(base)) and match.group(1) != ray_version:
        problems.append(f"FROM {base}: Ray {match.group(1)} is not ARG RAY_VERSION={ray_version}")
    if not any(RAY_PIN.search(part) for run in runs for part in run.split("&&") if "pip" in part):
        problems.append("no pip install pins ray==${RAY_VERSION}")
    if not any(RAY_EXACT_ASSERT in run and '"${RAY_VERSION}"' in run for run in runs):
        problems.append(f'the build must `{RAY_EXACT_ASSERT}` the "${{RAY_VERSION}}" it is given')
    python = args.get("PYTHON_VERSION", "")
    declared = PYTHON_VERSION_ARG.match(python)
    base_python = dockerfile_python(text)
    if not declared:
        problems.append(f"ARG PYTHON_VERSION={python!r} is not 3.N or 3.N.M")
    elif base_python is not None and f"3{declared.group(1)}" != base_python:
        problems.append(f"ARG PYTHON_VERSION={python} is not the Python of FROM {base}")
    if not any("sys.version_info" in run and '"${PYTHON_VERSION}"' in run for run in runs):
        problems.append('the build must check sys.version_info against "${PYTHON_VERSION}"')
    return problems


def check_dockerfile(text: str, repo: Path = REPO) -> list[str]:
    """Ray and Python versions, no pip cache, non-root user, existing COPY sources."""
    problems: list[str] = []
    instructions = dockerfile_instructions(text)
    base = dockerfile_base(text)
    match = RAY_BASE_IMAGE.match(base)
    if match:
        if ".".join(match.group(1).split(".")[:2]) != RAY_MAJOR_MINOR:
            problems.append(
                f"FROM {base}: Ray {match.group(1)} does not match installed Ray {RAY_VERSION}"
            )
    elif not PYTHON_BASE_IMAGE.match(base):
        problems.append(
            f"FROM {base!r} is neither a rayproject/ray:<x.y.z>-py<NN>-<cpu|cuXYZ> image nor a "
            "python:3.<N>-slim-<bookworm|trixie> image"
        )
    problems += check_versions(text)
    users = [args for instruction, args in instructions if instruction == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("the final USER must be a non-root user")
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    pip_commands = [
        part for run in runs for part in re.split(r"&&|;", run) if "pip install" in part
    ]
    if not pip_commands:
        problems.append("no RUN ... pip install")
    problems += [
        f"pip install without --no-cache-dir: {part.strip()}"
        for part in pip_commands
        if "--no-cache-dir" not in part
    ]
    for instruction, args in instructions:
        if instruction not in {"COPY", "ADD"}:
            continue
        sources, _ = _copy_sources(args)
        problems += [
            f"{instruction} source {src} does not exist in the build context (repository root)"
            for src in sources
            if not any(ch in src for ch in "*?[") and not (repo / src).exists()
        ]
    return problems


def check_image_pair(cpu: str, cuda: str) -> list[str]:
    """The CPU image (head, CPU workers) and the CUDA image (GPU workers) form one cluster, so
    they need the same Ray and the same Python x.y.z: both build on the same rayproject/ray
    version and Python tag (cpu and cuXYZ variants), with the same RAY_VERSION, PYTHON_VERSION
    and TORCH_VERSION; the CUDA torch index is the CUDA base's flavour, the CPU one the CPU
    wheels."""
    problems: list[str] = []
    bases: dict[str, re.Match[str]] = {}
    for name, text, flavour in (("Dockerfile.cpu", cpu, "cpu"), ("Dockerfile.cuda", cuda, "cu")):
        base = dockerfile_base(text)
        match = RAY_BASE_IMAGE.match(base)
        if match is None:
            problems.append(
                f"{name}: FROM {base!r} is not a rayproject/ray image; both images must build on "
                "the same Ray image family so that their Pythons match to the patch"
            )
        elif not match.group(3).startswith(flavour):
            problems.append(f"{name}: FROM {base} is not a {flavour}... variant")
        else:
            bases[name] = match
    if len(bases) == 2:
        cpu_base, cuda_base = bases["Dockerfile.cpu"], bases["Dockerfile.cuda"]
        if cpu_base.group(1) != cuda_base.group(1):
            problems.append(
                f"different Rays: {cpu_base.group(0)} and {cuda_base.group(0)} (every node must "
                "run the same Ray)"
            )
        if cpu_base.group(2) != cuda_base.group(2):
            problems.append(
                f"different Pythons: {cpu_base.group(0)} and {cuda_base.group(0)} (Ray refuses a "
                "node whose Python x.y.z differs from the head's)"
            )
    args = [dockerfile_args(dockerfile_instructions(text)) for text in (cpu, cuda)]
    for key in ("RAY_VERSION", "PYTHON_VERSION", "TORCH_VERSION"):
        if not args[0].get(key) or args[0].get(key) != args[1].get(key):
            problems.append(f"ARG {key} differs: {args[0].get(key)!r} and {args[1].get(key)!r}")
    cuda_index = args[1].get("TORCH_INDEX_URL", "").rstrip("/").rsplit("/", 1)[-1]
    if "Dockerfile.cuda" in bases and cuda_index != bases["Dockerfile.cuda"].group(3):
        problems.append(
            f"Dockerfile.cuda: torch index {cuda_index!r} is not the base's "
            f"{bases['Dockerfile.cuda'].group(3)!r}"
        )
    if not args[0].get("TORCH_INDEX_URL", "").rstrip("/").endswith("/cpu"):
        problems.append("Dockerfile.cpu: TORCH_INDEX_URL is not the CPU wheel index")
    if '"torch==${TORCH_VERSION}+cpu"' not in cpu:
        problems.append("Dockerfile.cpu must pin the CPU torch (torch==${TORCH_VERSION}+cpu)")
    return problems


# What the head container runs for the AWS cluster launcher and KubeRay, and the build asserts.
HEAD_IMAGE_CHECKS = {
    "ssh": "command -v ssh",
    "rsync": "command -v rsync",
    "wget": "command -v wget",
    "boto3": "import boto3",
}


def check_head_image_tools(text: str) -> list[str]:
    """The head image's build installs ssh, rsync, wget (where the base lacks them) and boto3,
    and asserts that each is there."""
    runs = " ".join(a for instruction, a in dockerfile_instructions(text) if instruction == "RUN")
    problems = [
        f"the build does not assert {tool} ({check!r})"
        for tool, check in HEAD_IMAGE_CHECKS.items()
        if check not in runs
    ]
    rest = runs
    for check in HEAD_IMAGE_CHECKS.values():
        rest = rest.replace(check, "")
    problems += [
        f"the build never installs {package}"
        for package in ("openssh-client", "rsync", "wget", "boto3")
        if not re.search(rf"(?<![\w-]){package}(?![\w-])", rest)
    ]
    return problems


def dockerfile_workdir(text: str) -> str | None:
    """The last WORKDIR of a Dockerfile."""
    dirs = [args for instruction, args in dockerfile_instructions(text) if instruction == "WORKDIR"]
    return dirs[-1] if dirs else None


# ---------------------------------------------------------------------------------------------
# Tests on the real files


@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_expected_infra_file_exists(name: str) -> None:
    assert (REPO / name).is_file(), f"{name} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_file_parses_and_holds_no_inline_secret(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{_rel(path)} holds no YAML document"
    problems = []
    for doc in docs:
        problems += find_inline_secrets(doc)
        problems += check_secret_object(doc, path.name)
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", TEXT_FILES, ids=_rel)
def test_infra_file_contains_no_key_material(path: Path) -> None:
    text = path.read_text(errors="replace")
    assert not AWS_KEY_ID.search(text), f"{_rel(path)} contains an AWS access key id"
    assert not PRIVATE_KEY_BLOCK.search(text), f"{_rel(path)} contains a private key"


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_rel)
def test_kuberay_file_is_a_valid_ray_deployment(path: Path) -> None:
    problems = [p for doc in load_docs(path) for p in check_kuberay_doc(doc)]
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


def test_secret_template_holds_every_key_the_pods_reference() -> None:
    (secret,) = load_docs(SECRET_TEMPLATE)
    assert secret["kind"] == "Secret"
    provided = set(secret["stringData"])
    referenced = {
        (value["name"], value["key"])
        for path in KUBERAY_FILES
        for doc in load_docs(path)
        for _, key, value in _walk(doc)
        if key == "secretKeyRef"
    }
    assert referenced, "the KubeRay files read no credentials from a Secret"
    assert {name for name, _ in referenced} == {secret["metadata"]["name"]}
    assert {key for _, key in referenced} <= provided, "secretKeyRef keys missing in the template"


@pytest.mark.parametrize("path", AWS_FILES, ids=_rel)
def test_aws_cluster_config_is_valid(path: Path) -> None:
    problems = [p for doc in load_docs(path) for p in check_aws_cluster(doc)]
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCKERFILES, ids=_rel)
def test_dockerfile_builds_on_matching_ray_image(path: Path) -> None:
    problems = check_dockerfile(path.read_text())
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


def _docker_texts() -> tuple[str, str]:
    return (
        (INFRA / "docker" / "Dockerfile.cpu").read_text(),
        (INFRA / "docker" / "Dockerfile.cuda").read_text(),
    )


def test_cpu_and_cuda_images_share_ray_python_and_torch() -> None:
    problems = check_image_pair(*_docker_texts())
    assert not problems, "\n".join(problems)


def test_the_head_image_has_what_the_cluster_tools_run_in_it() -> None:
    problems = check_head_image_tools(_docker_texts()[0])
    assert not problems, "infra/docker/Dockerfile.cpu:\n" + "\n".join(problems)


# A `fundus-batch:<version>-cuXYZ` image reference, as in the YAML files or the READMEs.
GPU_IMAGE_TAG = re.compile(rf"{OWN_IMAGE_NAME}:[\w.$<>{{}}-]*?-(cu\d+)\b")


def test_every_gpu_image_tag_under_infra_is_the_cuda_image_flavour() -> None:
    cuda_base = RAY_BASE_IMAGE.match(dockerfile_base(_docker_texts()[1]))
    assert cuda_base, "Dockerfile.cuda does not build on a rayproject/ray image"
    flavour = cuda_base.group(3)
    found = {
        f"{_rel(path)}: {match.group(0)}"
        for path in TEXT_FILES
        for match in GPU_IMAGE_TAG.finditer(path.read_text(errors="replace"))
    }
    assert found, "no GPU image tag found under infra/"
    wrong = sorted(ref for ref in found if not ref.endswith(f"-{flavour}"))
    assert not wrong, f"GPU image tags other than -{flavour} (Dockerfile.cuda):\n" + "\n".join(
        wrong
    )


RUNTIME_ENV_JSON = re.compile(r"--runtime-env-json '([^']*)'")


def test_readme_job_submissions_give_a_stopped_job_time_and_upload_no_image_path() -> None:
    found = 0
    for doc in sorted(INFRA.rglob("*.md")):
        for raw in RUNTIME_ENV_JSON.findall(doc.read_text()):
            found += 1
            runtime_env = json.loads(raw)
            where = f"{_rel(doc)}: --runtime-env-json {raw}"
            assert check_stop_wait(runtime_env) == [], where
            # A working_dir here is a path on the submitting machine (a laptop): never the
            # image's /home/ray/app (use absolute entrypoint paths or --working-dir .).
            assert "working_dir" not in runtime_env, where
    assert found >= 3, "the infra READMEs show fewer job submissions than expected"


def test_the_gpu_job_config_asks_for_cuda_and_the_cpu_one_does_not() -> None:
    configs = REPO / "jobs" / "configs"
    assert check_gpu_job_config(configs / "enhance_bucket.yaml") == []
    cpu = yaml.safe_load((configs / "enhance_bucket_cpu.yaml").read_text())
    assert cpu["enhance"]["device"] == "cpu"
    gpu = yaml.safe_load((configs / "enhance_bucket.yaml").read_text())
    assert cpu["out"] != gpu["out"], "the CPU and GPU configs must not share OUT"


def test_rayjob_working_dir_is_where_the_image_puts_the_jobs() -> None:
    text = (INFRA / "docker" / "Dockerfile.cpu").read_text()
    workdir = dockerfile_workdir(text)
    copies = [
        _copy_sources(args)
        for instruction, args in dockerfile_instructions(text)
        if instruction == "COPY"
    ]
    assert (["jobs"], f"{workdir}/jobs") in copies, (
        f"Dockerfile.cpu must COPY jobs to {workdir}/jobs"
    )
    for path in (INFRA / "kuberay").glob("rayjob-*.yaml"):
        for doc in load_docs(path):
            runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert runtime_env["working_dir"] == workdir, f"{_rel(path)}: working_dir != {workdir}"


def test_cluster_script_parses_cleans_up_and_runs_in_ci() -> None:
    script = INFRA / "test_cluster.sh"
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "trap cleanup EXIT" in text, "the cluster script must remove its containers on exit"
    assert '"$HOST_FB" verify "$OUT" --manifest' in text, "the cluster script must verify OUT"
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash infra/test_cluster.sh" in ci, ".ci/run must run the cluster test"


def test_job_paths_named_in_infra_docs_exist() -> None:
    missing = {
        f"{_rel(doc)}: {ref}"
        for doc in INFRA.rglob("*.md")
        for ref in re.findall(r"\bjobs/[\w./-]+\.(?:py|yaml)\b", doc.read_text())
        if not (REPO / ref).is_file()
    }
    assert not missing, "infra docs name job files that do not exist:\n" + "\n".join(
        sorted(missing)
    )


# ---------------------------------------------------------------------------------------------
# The rules catch broken documents


def _fake_repo(tmp_path: Path) -> Path:
    files = {
        "jobs/enhance_bucket.py": "",
        "jobs/configs/enhance.yaml": "enhance:\n  device: cuda\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def _container(image: str, gpus: int = 0) -> dict[str, Any]:
    block: dict[str, Any] = {"cpu": "2", "memory": "4Gi"}
    if gpus:
        block[GPU_RESOURCE] = gpus
    return {"name": "ray", "image": image, "resources": {"requests": dict(block), "limits": block}}


def _good_rayjob() -> dict[str, Any]:
    cpu_image = f"registry.example/{OWN_IMAGE_NAME}:{PROJECT_VERSION}-cpu"
    gpu_image = f"registry.example/{OWN_IMAGE_NAME}:{PROJECT_VERSION}-cu126"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "spec": {
            "entrypoint": "python jobs/enhance_bucket.py --config jobs/configs/enhance.yaml",
            "submissionMode": "K8sJobMode",
            "runtimeEnvYAML": (
                f"working_dir: /home/ray/app\nenv_vars:\n  A: '1'\n  {STOP_WAIT_VAR}: '120'\n"
            ),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 60,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},
                    "template": {"spec": {"containers": [_container(cpu_image)]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "cpu",
                        "replicas": 1,
                        "minReplicas": 0,
                        "maxReplicas": 3,
                        "rayStartParams": {},
                        "template": {"spec": {"containers": [_container(cpu_image)]}},
                    },
                    {
                        "groupName": "gpu",
                        "replicas": 0,
                        "minReplicas": 0,
                        "maxReplicas": 2,
                        "rayStartParams": {"num-gpus": "1"},
                        "template": {"spec": {"containers": [_container(gpu_image, 1)]}},
                    },
                ],
            },
        },
    }


def _head(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _group(doc: dict[str, Any], i: int) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][i]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _env(entry: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda doc: _head(doc).setdefault("env", []).append(entry)


FAKE_KEY_ID = "AKIA" + "Z" * 16  # built at run time so no scanner mistakes this file for a leak

RAYJOB_BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "aws-key-in-env": (_env({"name": "S3_USER", "value": FAKE_KEY_ID}), "AWS access key id"),
    "secret-env-literal": (
        _env({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc123"}),
        "use valueFrom.secretKeyRef",
    ),
    "password-in-runtime-env": (
        _set("spec.runtimeEnvYAML", "working_dir: /a\nenv_vars:\n  DB_PASSWORD: hunter2\n"),
        "DB_PASSWORD",
    ),
    "missing-script": (
        _set("spec.entrypoint", "python jobs/nope.py --config jobs/configs/enhance.yaml"),
        "script jobs/nope.py does not exist",
    ),
    "missing-config": (
        _set("spec.entrypoint", "python jobs/enhance_bucket.py --config jobs/configs/nope.yaml"),
        "--config file jobs/configs/nope.yaml does not exist",
    ),
    "no-config-flag": (_set("spec.entrypoint", "python jobs/enhance_bucket.py"), "no --config"),
    "not-python": (_set("spec.entrypoint", "bash run.sh --config x"), "is not `python"),
    "no-shutdown": (_set("spec.shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes"),
    "no-ttl": (lambda d: d["spec"].pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished"),
    "http-mode-local-dir": (_set("spec.submissionMode", "HTTPMode"), "must be K8sJobMode"),
    "latest-tag": (lambda d: _head(d).update(image="rayproject/ray:latest"), "uses :latest"),
    "untagged-image": (lambda d: _head(d).update(image="rayproject/ray"), "not pinned"),
    "wrong-flavour": (
        lambda d: _group(d, 1)["template"]["spec"]["containers"][0].update(
            image=f"r.example/{OWN_IMAGE_NAME}:{PROJECT_VERSION}-cpu"
        ),
        "GPU (-cuXYZ) image",
    ),
    "no-limits": (lambda d: _head(d)["resources"].pop("limits"), "no resources.limits"),
    "no-memory-request": (
        lambda d: _head(d)["resources"]["requests"].pop("memory"),
        "requests lacks memory",
    ),
    "replicas-above-max": (lambda d: _group(d, 0).update(replicas=9), "minReplicas <= replicas"),
    "min-above-max": (lambda d: _group(d, 0).update(minReplicas=5), "minReplicas <= replicas"),
    "no-bounds": (lambda d: _group(d, 0).pop("maxReplicas"), "must all be integers"),
    "gpu-group-without-gpu": (
        lambda d: _group(d, 1)["template"]["spec"]["containers"].__setitem__(
            0, _container(f"r.example/{OWN_IMAGE_NAME}:{PROJECT_VERSION}-cu126")
        ),
        "requests no nvidia.com/gpu",
    ),
    "gpu-job-without-gpu-group": (
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"].pop(1),
        "needs a worker group with nvidia.com/gpu",
    ),
    "num-gpus-missing": (lambda d: _group(d, 1).update(rayStartParams={}), "num-gpus must be"),
    "int-start-param": (lambda d: _group(d, 0).update(rayStartParams={"num-cpus": 4}), "string"),
    "ray-version": (_set("spec.rayClusterSpec.rayVersion", "2.9.3"), "does not match installed"),
    "api-version": (_set("apiVersion", "ray.io/v1alpha1"), "apiVersion must be ray.io/v1"),
    "kind": (_set("kind", "RayService"), "kind must be one of"),
    "no-autoscaling": (
        _set("spec.rayClusterSpec.enableInTreeAutoscaling", False),
        "enableInTreeAutoscaling",
    ),
    "no-stop-wait": (
        _set("spec.runtimeEnvYAML", "working_dir: /home/ray/app\nenv_vars:\n  A: '1'\n"),
        f"must set {STOP_WAIT_VAR}",
    ),
    "short-stop-wait": (
        _set("spec.runtimeEnvYAML", f"working_dir: /a\nenv_vars:\n  {STOP_WAIT_VAR}: '3'\n"),
        "is under",
    ),
    "unquoted-stop-wait": (
        _set("spec.runtimeEnvYAML", f"working_dir: /a\nenv_vars:\n  {STOP_WAIT_VAR}: 120\n"),
        "quoted number",
    ),
}


def test_good_rayjob_passes_every_rule(tmp_path: Path) -> None:
    doc = _good_rayjob()
    assert check_kuberay_doc(doc, _fake_repo(tmp_path)) == []
    assert find_inline_secrets(doc) == []


@pytest.mark.parametrize("name", sorted(RAYJOB_BREAKAGES))
def test_rayjob_rules_catch(name: str, tmp_path: Path) -> None:
    mutate, expected = RAYJOB_BREAKAGES[name]
    doc = _good_rayjob()
    mutate(doc)
    problems = check_kuberay_doc(doc, _fake_repo(tmp_path)) + find_inline_secrets(doc)
    assert any(expected in p for p in problems), f"{expected!r} not among {problems}"


def test_rules_catch_a_bad_yaml_file_end_to_end(tmp_path: Path) -> None:
    doc = _good_rayjob()
    doc["spec"]["entrypoint"] = "python jobs/gone.py --config jobs/configs/enhance.yaml"
    _head(doc)["env"] = [{"name": "AZURE_STORAGE_ACCOUNT_KEY", "value": "c2VjcmV0a2V5"}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    (loaded,) = load_docs(path)
    problems = check_kuberay_doc(loaded, _fake_repo(tmp_path)) + find_inline_secrets(loaded)
    assert any("jobs/gone.py does not exist" in p for p in problems), problems
    assert any("AZURE_STORAGE_ACCOUNT_KEY has a literal value" in p for p in problems), problems


def test_raycluster_needs_gpu_and_cpu_groups() -> None:
    doc = _good_rayjob()
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "spec": doc["spec"]["rayClusterSpec"],
    }
    assert check_kuberay_doc(cluster) == []
    only_cpu = copy.deepcopy(cluster)
    only_cpu["spec"]["workerGroupSpecs"].pop(1)
    assert any("GPU worker group" in p for p in check_kuberay_doc(only_cpu))
    only_gpu = copy.deepcopy(cluster)
    only_gpu["spec"]["workerGroupSpecs"].pop(0)
    assert any("CPU worker group" in p for p in check_kuberay_doc(only_gpu))


def _secret(**string_data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "stringData": string_data}


@pytest.mark.parametrize("text", ["enhance:\n  device: auto\n", "enhance:\n  batch_size: 8\n", ""])
def test_a_gpu_job_whose_config_does_not_ask_for_cuda_is_caught(text: str, tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    (repo / "jobs" / "configs" / "enhance.yaml").write_text(text)
    problems = check_kuberay_doc(_good_rayjob(), repo)
    assert any("must set enhance.device: cuda" in p for p in problems), problems


def test_secret_rules_allow_only_placeholders_in_example_files() -> None:
    assert check_secret_object(_secret(AWS_ACCESS_KEY_ID=PLACEHOLDER), "s.example.yaml") == []
    assert check_secret_object(_secret(AWS_SECRET_ACCESS_KEY="wJalr"), "s.example.yaml")
    assert check_secret_object(_secret(AWS_ACCESS_KEY_ID=PLACEHOLDER), "secret.yaml")
    encoded = base64.b64encode(b"real-value").decode()
    data_secret = {"kind": "Secret", "data": {"KEY": encoded}}
    assert check_secret_object(data_secret, "s.example.yaml")
    data_secret["data"]["KEY"] = base64.b64encode(PLACEHOLDER.encode()).decode()
    assert check_secret_object(data_secret, "s.example.yaml") == []
    # The generic scan also flags a credential-named key with a real value.
    assert find_inline_secrets(_secret(AZURE_STORAGE_ACCOUNT_KEY="c2VjcmV0"))
    assert find_inline_secrets(_secret(AZURE_STORAGE_ACCOUNT_KEY=PLACEHOLDER)) == []


def test_secret_scan_ignores_references_and_names() -> None:
    doc = {
        "env": [
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "AWS_SECRET_ACCESS_KEY"}},
            }
        ],
        "volumes": [{"name": "creds", "secret": {"secretName": "fundus-batch-storage"}}],
        "cmd": "docker login --username AWS --password-stdin host",
    }
    assert find_inline_secrets(doc) == []


def _good_aws() -> dict[str, Any]:
    image = f"r.example/{OWN_IMAGE_NAME}:{PROJECT_VERSION}"
    profile = {"Arn": "arn:aws:iam::REPLACE_ME:instance-profile/x"}
    return {
        "cluster_name": "t",
        "max_workers": 5,
        "provider": {"type": "aws", "region": "us-west-2"},
        "docker": {"image": f"{image}-cpu", "container_name": "ray"},
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": {"IamInstanceProfile": profile}},
            "cpu": {
                "min_workers": 0,
                "max_workers": 4,
                "resources": {"CPU": 8},
                "node_config": {"IamInstanceProfile": profile},
            },
            "gpu": {
                "min_workers": 0,
                "max_workers": 1,
                "resources": {"CPU": 4, "GPU": 1},
                "node_config": {"IamInstanceProfile": profile},
                "docker": {"worker_image": f"{image}-cu126", "worker_run_options": ["--gpus all"]},
            },
        },
        "file_mounts": {},
        "head_start_ray_commands": ["ray start --head --autoscaling-config=~/c.yaml"],
        "worker_start_ray_commands": ["ray start --address=$RAY_HEAD_IP:6379"],
    }


def _types(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"]


AWS_BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "head-type-missing": (_set("head_node_type", "nope"), "head_node_type 'nope'"),
    "no-gpu-type": (lambda c: _types(c).pop("gpu"), "no GPU worker type"),
    "no-cpu-type": (lambda c: _types(c).pop("cpu"), "no CPU worker type"),
    "min-above-max": (lambda c: _types(c)["cpu"].update(min_workers=9), "min_workers <="),
    "type-above-cluster-max": (lambda c: _types(c)["cpu"].update(max_workers=50), "<= 5"),
    "no-bounds": (lambda c: _types(c)["gpu"].pop("max_workers"), "must be set"),
    "no-profile": (lambda c: _types(c)["cpu"]["node_config"].clear(), "IamInstanceProfile"),
    "credentials-mount": (
        _set("file_mounts", {"~/.aws/credentials": "~/.aws/credentials"}),
        "credentials file",
    ),
    "schema": (_set("unknown_key", 1), "schema:"),
    "latest-image": (lambda c: c["docker"].update(image="rayproject/ray:latest"), ":latest"),
    "gpu-type-on-cpu-image": (
        lambda c: _types(c)["gpu"].pop("docker"),
        "GPU (-cuXYZ) image",
    ),
    "secret-in-setup": (
        _set("setup_commands", ["export AWS_SECRET_ACCESS_KEY=abc123"]),
        "inline AWS_SECRET_ACCESS_KEY",
    ),
    "key-in-setup": (_set("setup_commands", [f"echo {FAKE_KEY_ID}"]), "AWS access key id"),
    "no-autoscaling-config": (_set("head_start_ray_commands", ["ray start --head"]), "autoscaling"),
    "gpu-type-without-gpus-option": (
        lambda c: _types(c)["gpu"]["docker"].pop("worker_run_options"),
        "needs `--gpus all`",
    ),
}


def test_good_aws_config_passes_every_rule() -> None:
    cfg = _good_aws()
    assert check_aws_cluster(cfg) == []
    assert find_inline_secrets(cfg) == []


@pytest.mark.parametrize("name", sorted(AWS_BREAKAGES))
def test_aws_rules_catch(name: str) -> None:
    mutate, expected = AWS_BREAKAGES[name]
    cfg = _good_aws()
    mutate(cfg)
    problems = check_aws_cluster(cfg) + find_inline_secrets(cfg)
    assert any(expected in p for p in problems), f"{expected!r} not among {problems}"


GOOD_DOCKERFILE = f"""\
# syntax=docker/dockerfile:1
ARG BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-cpu
FROM ${{BASE_IMAGE}}
ARG RAY_VERSION={RAY_VERSION}
ARG PYTHON_VERSION=3.11
COPY --chown=1000:100 pyproject.toml README* /tmp/src/
RUN python -m pip install --no-cache-dir torch \\
    && python -m pip install --no-cache-dir /tmp/src "ray[data]==${{RAY_VERSION}}"
RUN python -c "import sys, ray; assert ray.__version__ == sys.argv[1]; \\
    assert sys.version_info[:2] == tuple(map(int, sys.argv[2].split('.')[:2]))" \\
    "${{RAY_VERSION}}" "${{PYTHON_VERSION}}"
USER 1000
"""

DOCKERFILE_BREAKAGES = {
    "old-ray": (f"ray:{RAY_VERSION}-py311", "ray:2.9.3-py311", "does not match"),
    "unknown-base": (
        f"rayproject/ray:{RAY_VERSION}-py311-cpu",
        "ubuntu:22.04",
        "is neither a rayproject/ray",
    ),
    "base-ray-is-not-the-pin": (
        f"rayproject/ray:{RAY_VERSION}-py311-cpu",
        f"rayproject/ray:{RAY_MAJOR_MINOR}.99-py311-cpu",
        "is not ARG RAY_VERSION",
    ),
    "pin-is-not-installed-ray": (
        f"ARG RAY_VERSION={RAY_VERSION}",
        f"ARG RAY_VERSION={RAY_MAJOR_MINOR}.99",
        "is not the installed Ray",
    ),
    "no-ray-pin": ('"ray[data]==${RAY_VERSION}"', "ray", "pins ray==${RAY_VERSION}"),
    "no-ray-assert": ("assert ray.__version__ == sys.argv[1]; ", "", "assert ray.__version__"),
    "python-arg-is-not-the-base": ("PYTHON_VERSION=3.11", "PYTHON_VERSION=3.12", "not the Python"),
    "python-arg-malformed": ("PYTHON_VERSION=3.11", "PYTHON_VERSION=py311", "is not 3.N"),
    "no-python-check": ('"${PYTHON_VERSION}"', "3.11", "check sys.version_info"),
    "root-user": ("USER 1000", "USER root", "non-root"),
    "pip-cache": ("--no-cache-dir /tmp/src", "/tmp/src", "without --no-cache-dir"),
    "missing-copy-source": ("pyproject.toml README*", "nope.toml", "nope.toml does not exist"),
}


def test_good_dockerfile_passes_every_rule() -> None:
    assert check_dockerfile(GOOD_DOCKERFILE) == []


def test_a_debian_python_base_passes_the_single_file_rules() -> None:
    # The local debootstrap base of infra/test_cluster.sh is a build argument; a python: base
    # as the default is allowed for one image, never for the CPU/CUDA pair (check_image_pair).
    text = GOOD_DOCKERFILE.replace(
        f"rayproject/ray:{RAY_VERSION}-py311-cpu", "python:3.11-slim-bookworm"
    )
    assert check_dockerfile(text) == []
    assert dockerfile_python(text) == "311"
    assert any("not the Python" in p for p in check_dockerfile(text.replace("=3.11", "=3.12")))


@pytest.mark.parametrize("name", sorted(DOCKERFILE_BREAKAGES))
def test_dockerfile_rules_catch(name: str) -> None:
    old, new, expected = DOCKERFILE_BREAKAGES[name]
    assert old in GOOD_DOCKERFILE
    problems = check_dockerfile(GOOD_DOCKERFILE.replace(old, new))
    assert any(expected in p for p in problems), f"{expected!r} not among {problems}"


# Edits of the real Dockerfiles (CPU, CUDA) that break the pair, and what the rule says.
PAIR_BREAKAGES = {
    "cpu-on-python-slim": (
        (
            f"ARG BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-cpu",
            "ARG BASE_IMAGE=python:3.11-slim-bookworm",
        ),
        None,
        "Dockerfile.cpu: FROM 'python:3.11-slim-bookworm' is not a rayproject/ray image",
    ),
    "cuda-other-python": (None, ("-py311-cu126", "-py312-cu126"), "different Pythons"),
    "cuda-other-ray": (None, (f"ray:{RAY_VERSION}-py311", "ray:0.0.1-py311"), "different Rays"),
    "cpu-on-cuda-base": (("-py311-cpu", "-py311-cu126"), None, "is not a cpu... variant"),
    "cuda-on-cpu-base": (None, ("-py311-cu126", "-py311-cpu"), "is not a cu... variant"),
    "python-arg": (("PYTHON_VERSION=3.11", "PYTHON_VERSION=3.11.9"), None, "ARG PYTHON_VERSION"),
    "ray-arg": (
        None,
        (f"RAY_VERSION={RAY_VERSION}", "RAY_VERSION=0.0.1"),
        "ARG RAY_VERSION differs",
    ),
    "torch": (("TORCH_VERSION=2.13.0", "TORCH_VERSION=2.12.0"), None, "ARG TORCH_VERSION"),
    "cuda-index": (None, ("whl/cu126", "whl/cu128"), "torch index 'cu128' is not the base's"),
    "cpu-index": (("whl/cpu", "whl/cu126"), None, "not the CPU wheel index"),
}


@pytest.mark.parametrize("name", sorted(PAIR_BREAKAGES))
def test_image_pair_rules_catch(name: str) -> None:
    cpu_edit, cuda_edit, expected = PAIR_BREAKAGES[name]
    texts = list(_docker_texts())
    for i, edit in enumerate((cpu_edit, cuda_edit)):
        if edit is not None:
            assert edit[0] in texts[i], f"{edit[0]!r} not in the real Dockerfile"
            texts[i] = texts[i].replace(edit[0], edit[1])
    problems = check_image_pair(*texts)
    assert any(expected in p for p in problems), f"{expected!r} not among {problems}"


@pytest.mark.parametrize("tool", ["ssh", "rsync", "wget", "boto3"])
def test_head_image_rules_catch_a_missing_tool(tool: str) -> None:
    text = _docker_texts()[0].replace(HEAD_IMAGE_CHECKS[tool], "true")
    assert any(tool in p for p in check_head_image_tools(text))
    boto3 = '"boto3<=${botocore_version}"'
    package = {"ssh": "openssh-client", "boto3": boto3}.get(tool, f'"$pkgs {tool}"')
    text = _docker_texts()[0].replace(package, "")
    assert any("never installs" in p for p in check_head_image_tools(text)), tool


def test_ci_runs_each_step_of_the_readme_test_command_on_a_line_of_its_own() -> None:
    # Under set -e only the last command of an && chain stops the script when it fails.
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    command = next(line for line in readme if line.endswith("pytest -q -rs"))
    ci_lines = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}
    for step in command.split(" && "):
        assert step.strip() in ci_lines, f".ci/run must run {step.strip()!r} on its own line"


def test_the_docker_readme_tags_images_with_the_package_version() -> None:
    readme = (INFRA / "docker" / "README.md").read_text(encoding="utf-8").splitlines()
    [line] = [x for x in readme if x.startswith("VERSION=")]
    shown = subprocess.run(
        ["bash", "-c", f'{line}\nprintf %s "$VERSION"'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown == fundus_batch.__version__
