"""The cluster deployment files (cluster/) parse, match what Ray and KubeRay expect, and name only
things that exist: repository paths, `rayseg` command lines the real CLI parser accepts, and
experiment files that load with their `--set` values."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.runtime_env import RuntimeEnv

from rayseg import cli
from rayseg import config as cfgmod
from rayseg.train.launch import TRAIN_DRIVER_RESOURCE

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
TEXT_FILES = YAML_FILES + [CLUSTER / "README.md", CLUSTER / "Dockerfile"]
# Packages the cluster brings itself: never in the runtime env's pip list.
CLUSTER_OWN_PACKAGES = {"torch", "torchvision", "ray"}


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML documents"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping: {d!r}"
    return docs


def one_doc(path: Path, kind: str | None = None) -> dict:
    docs = [d for d in load_docs(path) if kind is None or d.get("kind") == kind]
    assert len(docs) == 1, f"{path}: expected one {kind or 'document'}, found {len(docs)}"
    return docs[0]


def strings(node) -> list[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def readme_shell_commands() -> list[str]:
    """Commands in the README's ```bash blocks, continuation lines joined."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert blocks, "cluster/README.md has no bash blocks"
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def rayseg_invocations(command: str) -> list[list[str]]:
    """The argument lists of every `rayseg ...` / `python -m rayseg ...` in a shell command."""
    found = []
    for part in re.split(r"&&|\|\||;|\||\n", command):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        for i, w in enumerate(words[:-1]):  # a bare "rayseg" (a name, not a command) has no arguments
            if w == "rayseg" and (i == 0 or words[i - 1] in ("-m", "--")) or w.endswith("/rayseg") and i == 0:
                found.append(words[i + 1:])
                break
    return found


def all_rayseg_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in YAML_FILES:
        for s in strings(load_docs(path)):
            out += [(str(path.relative_to(REPO)), args) for args in rayseg_invocations(s)]
    for line in readme_shell_commands():
        out += [("cluster/README.md", args) for args in rayseg_invocations(line)]
    return out


# --------------------------------------------------------------------------------------------


def test_every_yaml_parses():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {"runtime_env.yaml", "aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names
    for path in YAML_FILES:
        load_docs(path)


def test_runtime_env_is_valid_and_matches_pyproject():
    env = one_doc(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert all(isinstance(v, str) for v in env["env_vars"].values())

    # pip = rayseg's runtime dependencies, minus what the cluster brings (CUDA torch, Ray).
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    name = lambda req: re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()  # noqa: E731
    expected = {d for d in deps if name(d) not in CLUSTER_OWN_PACKAGES}
    assert set(env["pip"]) == expected
    assert not {name(p) for p in env["pip"]} & CLUSTER_OWN_PACKAGES

    # The excludes keep every package and experiment file (an unanchored "data/" would drop
    # rayseg/data/) and drop the local datasets, runs and virtualenv. Ray's own matcher:
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    needed = [p.relative_to(REPO).as_posix() for d in ("rayseg", "experiments", "cluster")
              for p in (REPO / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.startswith("rayseg/data/") for p in needed)
    assert not [p for p in needed if spec.match_file(p)]
    for dropped in ("data/synth/manifest.json", "runs/mlflow.db", ".venv/bin/python", "mlruns/0/meta.yaml",
                    "rayseg/__pycache__/cli.cpython-311.pyc"):
        assert spec.match_file(dropped), dropped


def test_launcher_config_matches_ray_schema():
    conf = one_doc(CLUSTER / "aws-gpu.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(conf, schema)

    types = conf["available_node_types"]
    head = types[conf["head_node_type"]]
    assert head["resources"][TRAIN_DRIVER_RESOURCE] > 0
    start = " ".join(conf["head_start_ray_commands"])
    assert f'--resources=\'{{"{TRAIN_DRIVER_RESOURCE}": 100}}\'' in start
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))]
    assert gpu and all(t["max_workers"] > t["min_workers"] for t in gpu), "no autoscaling GPU worker type"
    # Shared storage at the same path on every node, inside the container too.
    assert any("/shared" in c and "mount" in c for c in conf["initialization_commands"])
    assert "-v /shared:/shared" in conf["docker"]["run_options"]
    setup = " ".join(conf["setup_commands"])
    assert "pip install -q -e /home/ray/rayseg" in setup and "/home/ray/rayseg" in conf["file_mounts"]
    assert conf["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def _pod_specs(node) -> list[dict]:
    """Every pod spec (a dict with 'containers') in a manifest."""
    if isinstance(node, dict):
        here = [node] if isinstance(node.get("containers"), list) else []
        return here + [s for v in node.values() for s in _pod_specs(v)]
    if isinstance(node, list):
        return [s for v in node for s in _pod_specs(v)]
    return []


def test_kuberay_manifests_are_consistent():
    docs = load_docs(CLUSTER / "kuberay" / "raycluster.yaml")
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayCluster") == 1 and "PersistentVolumeClaim" in kinds and "Service" in kinds
    rc = one_doc(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    pvc = one_doc(CLUSTER / "kuberay" / "raycluster.yaml", "PersistentVolumeClaim")
    svc = one_doc(CLUSTER / "kuberay" / "raycluster.yaml", "Service")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == ray.__version__
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # Head: KubeRay passes rayStartParams.resources to `ray start --resources` as a quoted JSON string.
    params = rc["spec"]["headGroupSpec"]["rayStartParams"]
    assert json.loads(json.loads(params["resources"]))[TRAIN_DRIVER_RESOURCE] > 0
    assert params["dashboard-host"] == "0.0.0.0"
    gpu_groups = [g for g in rc["spec"]["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and all(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups)
    assert rc["spec"]["enableInTreeAutoscaling"] is True

    # Every pod (Ray head and workers, MLflow) mounts the one shared claim at /shared.
    pods = _pod_specs(docs)
    assert len(pods) == 4
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert claims.get(mounts.get("/shared")) == pvc["metadata"]["name"], pod["containers"][0]["name"]

    job = one_doc(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # The working dir is the repository inside the image (validated there, by the submitter pod).
    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M).group(1)
    assert runtime_env.pop("working_dir") == workdir
    RuntimeEnv(**runtime_env)
    assert runtime_env["env_vars"] == one_doc(CLUSTER / "runtime_env.yaml")["env_vars"]
    # The job's tracking URI is the MLflow service of the cluster manifest.
    (args,) = rayseg_invocations(job["spec"]["entrypoint"])
    uri = cli.build_parser().parse_args(args).overrides
    assert f"tracking.uri=http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}" in uri
    images = {c["image"] for pod in _pod_specs([docs, job]) for c in pod["containers"]}
    assert len(images) == 1, images  # one image, built from cluster/Dockerfile


def test_rayseg_commands_parse_and_their_experiments_load():
    commands = all_rayseg_commands()
    parser = cli.build_parser()
    for where, args in commands:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                ns = parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"{where}: `rayseg {' '.join(args)}` does not parse: {err.getvalue()}")
        config = getattr(ns, "config", None)
        if config:
            path = REPO / config
            assert path.is_file(), f"{where}: experiment file {config} does not exist"
            cfgmod.load(path, ns.overrides)  # every --set key must exist and type-check
    used = {args[0] for _, args in commands}
    assert {"tune", "prepare", "partition", "inspect"} <= used, used  # the walkthrough is covered
    assert any(w == "cluster/kuberay/rayjob.yaml" and a[0] == "tune" for w, a in commands)


# Repository paths named in the files: cluster/..., experiments/..., rayseg/... (not /home/ray/rayseg/...).
REPO_PATH = re.compile(r"(?<![\w/.-])((?:cluster|experiments|rayseg|tests|benchmarks)/[\w./-]*\w)")


def test_referenced_repository_paths_exist():
    named = set()
    for path in TEXT_FILES:
        for ref in REPO_PATH.findall(path.read_text()):
            named.add(ref)
            assert (REPO / ref).exists(), f"{path.relative_to(REPO)} names {ref}, which does not exist"
    assert {"cluster/runtime_env.yaml", "cluster/aws-gpu.yaml", "cluster/Dockerfile"} <= named
    # The Dockerfile copies only what exists.
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"cluster/Dockerfile copies {src}, which does not exist"
    # The launcher copies the repository root, which it must be run from.
    assert os.path.samefile(REPO / one_doc(CLUSTER / "aws-gpu.yaml")["file_mounts"]["/home/ray/rayseg"], REPO)
