"""Ray start-up: join a cluster when given its address, else start an embedded single-machine Ray
that listens on 127.0.0.1 only.

Ray binds its GCS, raylet, worker and Prometheus-metrics servers to the node's IP address. For a
local start that is the machine's public address unless Ray believes multi-node support is off;
``ray.init(_node_ip_address="127.0.0.1")`` does not help, since ray.init rewrites a loopback
address to the public one. Multi-node support is the flag Ray reads from its
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` variable when it is imported (off on Windows and macOS,
where Ray then runs on 127.0.0.1); it is turned off only for the duration of the local
``ray.init`` call, so joining a real cluster later in the same process is unaffected. Nothing
outside the machine can then reach the local Ray (its GCS, workers, or ``GET /metrics``).
"""

from __future__ import annotations

import os

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def init_ray(address: str = "", **local_kwargs) -> None:
    """Join ``address`` (or RAY_ADDRESS) if set, else start a local Ray bound to 127.0.0.1
    (``local_kwargs`` go to its ray.init; the dashboard is off unless asked for). No-op when
    Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, **{k: v for k, v in local_kwargs.items() if k == "log_to_driver"})
        return
    init_local(**local_kwargs)


def init_local(**kwargs) -> None:
    """Start an embedded Ray whose servers listen on 127.0.0.1 only (see the module doc)."""
    import ray
    from ray._private import ray_constants

    kwargs.setdefault("include_dashboard", False)
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # node IP = loopback for this start
    try:
        ray.init(**kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    ip = ray.util.get_node_ip_address()
    if ip not in LOOPBACK:  # a Ray version that no longer honours the flag: say so
        print(f"[rayseg] WARNING: the local Ray listens on {ip}, not 127.0.0.1: its ports (GCS, "
              "workers, metrics) may be reachable from the network", flush=True)
