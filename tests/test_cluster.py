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


# --------------------------------------------------------------------------------------------
# The MLflow tracking server: never without a password, never open beyond the cluster
# --------------------------------------------------------------------------------------------


def _mlflow_server_commands() -> list[tuple[str, str]]:
    """(file, command) for every `mlflow server` the cluster files and README start."""
    out = [(str(p.relative_to(REPO)), s) for p in YAML_FILES for s in strings(load_docs(p))
           if "mlflow server" in s]
    text = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        out += [("cluster/README.md", block.replace("\\\n", " "))] if "mlflow server" in block else []
    return out


def test_every_mlflow_server_asks_for_a_password():
    commands = _mlflow_server_commands()
    assert {where for where, _ in commands} == {"cluster/aws-gpu.yaml", "cluster/kuberay/raycluster.yaml",
                                                "cluster/README.md"}
    for where, command in commands:
        assert "--app-name basic-auth" in command, where
    # The settings file each start names (the image and the launcher hold the repo at /home/ray/rayseg).
    aws = one_doc(CLUSTER / "aws-gpu.yaml")
    head = " ".join(aws["head_start_ray_commands"])
    assert "MLFLOW_AUTH_CONFIG_PATH=/home/ray/rayseg/cluster/mlflow-auth.ini" in head
    assert (REPO / "cluster" / "mlflow-auth.ini").is_file()
    # AWS: the credentials exist before anything starts, and every raylet (so every worker,
    # every job driver) exports them; the auth app is installed.
    creds = next(i for i, c in enumerate(aws["head_start_ray_commands"]) if "cluster/mlflow_auth.py" in c)
    starts = [c for c in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("set -a && . /shared/mlflow/auth.env && set +a &&") for c in starts)
    assert creds < next(i for i, c in enumerate(aws["head_start_ray_commands"]) if "ray start" in c)
    assert 'pip install -q "mlflow[auth]"' in aws["setup_commands"]
    assert '"mlflow[auth]"' in (CLUSTER / "Dockerfile").read_text()


def test_kuberay_mlflow_gets_its_secret_and_only_ray_pods_reach_it():
    docs = load_docs(CLUSTER / "kuberay" / "raycluster.yaml")
    rc = one_doc(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    mlflow = one_doc(CLUSTER / "kuberay" / "raycluster.yaml", "Deployment")
    svc = one_doc(CLUSTER / "kuberay" / "raycluster.yaml", "Service")
    policy = one_doc(CLUSTER / "kuberay" / "raycluster.yaml", "NetworkPolicy")
    secret_of = lambda c: [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]  # noqa: E731
    (server,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert secret_of(server) == ["rayseg-mlflow-auth"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/home/ray/rayseg/cluster/mlflow-auth.ini"
    ray_pods = [p for p in _pod_specs(docs) if p["containers"][0]["name"] != server["name"]]
    assert len(ray_pods) == 3 and all(secret_of(c) == ["rayseg-mlflow-auth"] for p in ray_pods for c in p["containers"])
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    labels = mlflow["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": rc["metadata"]["name"]}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": svc["spec"]["ports"][0]["targetPort"]}]
    # The README's secret is the one the manifests read.
    assert "kubectl create secret generic rayseg-mlflow-auth --from-env-file=auth.env" in \
        (CLUSTER / "README.md").read_text()


@pytest.mark.slow
def test_mlflow_recipe_refuses_strangers_and_admits_rayseg(tmp_path):
    """The recipe itself, on this machine: cluster/mlflow_auth.py's env file, the basic-auth app
    with cluster/mlflow-auth.ini (its user store moved into tmp_path), then an anonymous request
    and rayseg's tracker with the file's client variables."""
    import importlib.util
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    spec = importlib.util.spec_from_file_location("mlflow_auth", CLUSTER / "mlflow_auth.py")
    mlflow_auth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mlflow_auth)
    env_file = tmp_path / "auth.env"
    assert mlflow_auth.write_auth_env(env_file) and not mlflow_auth.write_auth_env(env_file)  # kept
    assert env_file.stat().st_mode & 0o777 == 0o600
    creds = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert creds["MLFLOW_TRACKING_PASSWORD"] == creds["MLFLOW_AUTH_ADMIN_PASSWORD"] and len(creds) == 5
    ini = (CLUSTER / "mlflow-auth.ini").read_text().replace("sqlite:////shared/mlflow/basic_auth.db",
                                                            f"sqlite:///{tmp_path / 'basic_auth.db'}")
    (tmp_path / "auth.ini").write_text(ini)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_env = {**os.environ, **{k: v for k, v in creds.items() if not k.startswith("MLFLOW_TRACKING_")},
                  "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "the MLflow server did not start in 120 s"
                time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401
        code = ("from rayseg import config as c; from rayseg.train.tracking import Tracker; "
                f"t = Tracker(c.replace(c.Config(), **{{'tracking.uri': '{uri}', 'data.root': ''}}), 'auth', "
                "dataset_context=None); t.log_metrics({'x': 1.0}, 0); t.end(); print(t.run_id)")
        client_env = {**os.environ, "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_TRACKING_USERNAME"],
                      "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"]}
        logged = subprocess.run([sys.executable, "-c", code], env=client_env, capture_output=True, text=True,
                                timeout=120)
        assert logged.returncode == 0, logged.stderr[-2000:]
        no_password = {k: v for k, v in client_env.items() if not k.startswith("MLFLOW_TRACKING_")}
        anonymous = subprocess.run([sys.executable, "-c", code], env=no_password, capture_output=True, text=True,
                                   timeout=120)
        assert anonymous.returncode != 0 and "401" in anonymous.stderr
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
