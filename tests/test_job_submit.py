"""`ray job submit` of a `rayseg tune` sweep to a REAL local Ray head, as cluster/README.md does on a cluster.

The test starts its own head (`ray start --head --block` with its own --temp-dir and its own
ports, dashboard on 127.0.0.1, TRAIN_DRIVER resource declared like the cluster configs), stages a
tiny synthetic dataset with one job (`rayseg prepare synthetic` + `rayseg partition`), submits a
`rayseg tune` job over a 2-point grid, waits for it, checks the MLflow runs it left in a sqlite
store, and stops only that head: every process of its session and every descendant of its
`ray start`, by pid (`ray stop` would stop every Ray on the machine).

Runtime env: the repository's cluster/runtime_env.yaml, with its working_dir (this checkout),
excludes and env_vars as they are, but WITHOUT its `pip` list. Ray installs a runtime env's pip
packages into a copy of the current virtualenv (measured here: 2.1 GB cloned, +36 s per job), which
does not fit the test budget; test_cluster.py validates that list instead (Ray's RuntimeEnv parser,
equality with pyproject's dependencies).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from rayseg.train.launch import TRAIN_DRIVER_RESOURCE
from tiny import TINY_RUN, toml_text

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

# The shared tiny run (tests/tiny.py), 3D only, 2 train + 1 val scenes,
# one stage of one epoch: the job plumbing is under test here, not the method.
PREPARE = ["--scenes", "3", "--views", "0",
           "--set", "synthetic.val_fraction=0.34", "--set", "synthetic.min_points=1500",
           "--set", "synthetic.max_points=2500", "--set", "synthetic.points_per_m2=30.0"]
TINY_JOB = {**TINY_RUN, "name": "jobtest", "seed": 0, "data.num_views": 0, "data.monitor_scenes": 1,
            "data.region_column": "shape_detection", "optim.cmg_epochs": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every live process (zombies excluded)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def auth_mode() -> str:
    """Ray 2.60 token auth, for the head and the CLI alike: on ("token") when Ray has a token
    where it looks for one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token: written by
    the first local ray.init()), off on a machine that never ran Ray."""
    has_token = (os.environ.get("RAY_AUTH_TOKEN")
                 or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file())
    return "token" if has_token else "disabled"


class LocalHead:
    """A Ray head of our own: its own temp dir and ports, stopped by pid."""

    def __init__(self, workdir: Path):
        # Unix socket paths live under the temp dir and must stay short (< 108 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rs-head-", dir="/tmp"))
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        low = 20000 + 200 * (os.getpid() % 45)  # worker ports: away from Ray's default 10002-19999
        ports = {"--port": free_port(), "--ray-client-server-port": free_port(),
                 "--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
                 "--min-worker-port": low, "--max-worker-port": low + 199}
        cmd = [RAY, "start", "--head", "--block", "--temp-dir", str(self.temp_dir),
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
               "--num-cpus", "2", "--resources", json.dumps({TRAIN_DRIVER_RESOURCE: 100}),
               "--disable-usage-stats"]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        # `python` in a job's entrypoint is whatever the head's PATH finds first: this venv's.
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                        RAY_AUTH_MODE=auth_mode())
        self.log = open(workdir / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=workdir)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the dashboard answers HTTP (401 counts: token auth is on)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"ray start exited: {Path(self.log.name).read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"dashboard of the test head not up after {timeout} s")

    def processes(self) -> set[int]:
        """This head's processes: its session (ray start, GCS, raylet, dashboard, workers) and
        every descendant of `ray start` (job drivers run in sessions of their own)."""
        table = _proc_table()
        mine = {pid for pid, (_, sid, _) in table.items() if sid == self.proc.pid}
        frontier = {self.proc.pid}
        while frontier:
            children = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - mine - frontier
            mine |= frontier
            frontier = children
        return {p for p in mine if p in table}

    def stop(self) -> set[int]:
        """SIGTERM, then SIGKILL after 5 s, every process of this head only. Returns survivors."""
        pids = self.processes()
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while time.time() < deadline:
                self.proc.poll()  # reap `ray start`
                pids = pids & set(_proc_table())
                if not pids:
                    break
                time.sleep(0.2)
        self.proc.poll()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return pids


def ray_job_submit(head: LocalHead, runtime_env: Path, entrypoint: list[str], timeout: float) -> str:
    """`ray job submit` from the repository root, waiting for the job; returns its output."""
    cmd = [RAY, "job", "submit", "--address", head.address, "--working-dir", str(REPO),
           "--runtime-env", str(runtime_env), "--", *entrypoint]
    try:  # head.env carries RAY_AUTH_MODE: the CLI then sends the token Ray keeps in ~/.ray
        done = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{shlex.join(entrypoint)}` did not finish in {timeout} s:\n{(exc.stdout or '')[-4000:]}")
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, f"job `{shlex.join(entrypoint)}` failed:\n{out[-6000:]}"
    return out


def test_tune_job_on_a_local_head(tmp_path):
    repo_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    job_env = {k: v for k, v in repo_env.items() if k != "pip"}  # see the module docstring
    assert job_env["working_dir"] == "." and job_env["env_vars"]
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump(job_env))

    data = tmp_path / "data"
    runs = tmp_path / "runs"
    db = tmp_path / "mlflow.db"
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(toml_text({**TINY_JOB, "data.root": str(data)}, grid={"loss.rpc.eta": [0.5, 0.8]}))

    t0 = time.time()
    head = LocalHead(tmp_path)
    try:
        head.wait_ready()
        print(f"[job test] head up after {time.time() - t0:.0f} s", flush=True)
        # Stage the data on the "shared storage" (here: the tmp dir), as one job; first show
        # where the job's rayseg and environment come from.
        probe = "import os, rayseg; print('probe:', rayseg.__file__, os.environ['MLFLOW_DISABLE_TELEMETRY'])"
        stage = " && ".join([
            shlex.join(["python", "-c", probe]),
            shlex.join(["python", "-m", "rayseg", "prepare", "synthetic", "--out", str(data), *PREPARE]),
            shlex.join(["python", "-m", "rayseg", "partition", str(data), "--method", "shape_detection"])])
        out = ray_job_submit(head, runtime_env, ["sh", "-c", stage], timeout=240)
        assert (data / "manifest.json").is_file(), out[-3000:]
        # The uploaded working dir (not this checkout's path) and the env vars of runtime_env.yaml.
        probe_line = next(line for line in out.splitlines() if line.startswith("probe:"))
        assert "/runtime_resources/working_dir_files/" in probe_line and str(REPO) not in probe_line
        assert probe_line.endswith(" " + job_env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"])
        print(f"[job test] data staged after {time.time() - t0:.0f} s", flush=True)

        # The sweep, exactly as cluster/README.md submits it (absolute paths: no shared storage here).
        out = ray_job_submit(head, runtime_env, [
            "python", "-m", "rayseg", "tune", str(experiment), "--name", "jobsweep",
            "--set", f"tracking.uri=sqlite:///{db}", "--set", f"tracking.runs_dir={runs}",
            "--set", "tracking.experiment=jobtest"], timeout=600)
        print(f"[job test] sweep done after {time.time() - t0:.0f} s", flush=True)
    finally:
        survivors = head.stop()
        print(f"[job test] head stopped after {time.time() - t0:.0f} s", flush=True)
    assert not survivors, f"processes of the test head still running: {survivors}"
    assert not [p for p in _proc_table() if str(head.temp_dir) in _cmdline(p)]

    # MLflow: one parent run for the sweep, one finished child run per grid point.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("jobtest")
    assert exp is not None, out[-4000:]
    runs_found = client.search_runs([exp.experiment_id])
    parents = [r for r in runs_found if r.data.tags.get("rayseg.sweep_role") == "parent"]
    assert len(parents) == 1, out[-4000:]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["rayseg.sweep"] == "jobsweep"
    assert {k for k in parent.data.params if k.startswith("trial/")} == {"trial/000", "trial/001"}
    children = [r for r in runs_found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # a trial Tune retried (tune.max_failures) leaves its dead attempt's run superseded and KILLED
    superseded = [r for r in children if r.data.tags.get("rayseg.superseded") == "true"]
    assert all(r.info.status == "KILLED" for r in superseded), out[-4000:]
    children = [r for r in children if r.data.tags.get("rayseg.superseded") != "true"]
    assert sorted(r.data.params["loss.rpc.eta"] for r in children) == ["0.5", "0.8"], out[-4000:]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["model.backbone_3d"] == "MinkUNet14A"
        assert child.data.params["data.root"] == str(data)
        metrics = child.data.metrics
        assert 0.0 <= metrics["pseudo_final_3d_miou"] <= 1.0, sorted(metrics)
        # the training curves are in the trial's stage runs (sweep -> trial -> stages)
        stages = {r.info.run_name: r for r in runs_found if r.data.tags.get("mlflow.parentRunId") == child.info.run_id}
        assert "loss" in stages["cmg_rpc"].data.metrics, sorted(stages)
    # Results on the "shared storage": the sweep directory with one complete run per trial.
    trials = sorted((runs / "jobsweep" / "trials").iterdir())
    assert len(trials) == 2 and all((t / "result.json").is_file() for t in trials)
