"""The embedded local Ray listens on 127.0.0.1 only: no GCS, raylet, worker or metrics port is
reachable from the network. (A plain ray.init() here: GCS, raylet and workers on *, the metrics
exporter on 0.0.0.0, node IP the machine's public address; measured with `ss -ltnp`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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

