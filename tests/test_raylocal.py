"""The embedded local Ray listens on 127.0.0.1 only: no GCS, raylet, worker or metrics port is
reachable from the network. (A plain ray.init() here: GCS, raylet and workers on *, the metrics
exporter on 0.0.0.0, node IP the machine's public address; measured with `ss -ltnp`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Runs in its own process (one Ray per process): starts Ray the way rayseg's commands do, runs
# one task so a worker exists, then lists the TCP sockets its process tree listens on.
SCRIPT = """
import json, sys
import ray
from rayseg.raylocal import init_local
import psutil  # shipped with Ray (ray/thirdparty_files) when not installed on its own

init_local(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())
session = ray._private.worker._global_node.get_session_dir_path()
me = psutil.Process()
procs = {p.pid: p for p in me.children(recursive=True)} | {me.pid: me}
for p in psutil.process_iter(["cmdline"]):  # gcs_server, agents: named by the session dir
    if session in " ".join(p.info["cmdline"] or []):
        procs[p.pid] = p
listening = []
for p in procs.values():
    try:
        conns = p.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        continue
    listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "listening": listening}))
ray.shutdown()
"""

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listeners() -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_ray_listens_on_loopback_only():
    got = _listeners()
    assert got["node_ip"] == "127.0.0.1"
    names = {name for name, _, _ in got["listening"]}
    assert {"gcs_server", "raylet"} <= names, got  # the servers were found, so the check means something
    public = [entry for entry in got["listening"] if entry[1] not in LOOPBACK]
    assert not public, public



# A Ray Train worker that prints one line, started the way rayseg's train / tune start Ray.
PRINT_ONCE = """
import sys
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from rayseg import config as cfgmod
from rayseg.train import launch

launch.init_ray(cfgmod.Config())

def train(config):
    print("rayseg-marker-7f3a", flush=True)

TorchTrainer(train, torch_config=TorchConfig(backend="gloo"),
             scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
             run_config=ray.train.RunConfig(storage_path=sys.argv[1], name="print-once")).fit()
"""


@pytest.mark.slow
def test_a_worker_line_reaches_the_console_once(tmp_path):
    """Ray Train's print patch echoed every worker line twice (measured: 2 with
    RAY_TRAIN_ENABLE_PRINT_PATCH=1, rayseg's launch now sets it to 0)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_ENABLE_PRINT_PATCH"}
    out = subprocess.run([sys.executable, "-c", PRINT_ONCE, str(tmp_path / "ray")], capture_output=True, text=True,
                         timeout=300, env={**env, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("rayseg-marker-7f3a") == 1, out.stdout[-3000:]
