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

import logging
import os

LOOPBACK = ("127.0.0.1", "::1", "localhost")

# Ray loggers whose warnings carry no news for rayseg's users, silenced in every Ray worker:
# Ray Train's PlacementGroupCleaner (a detached actor beside each Train run) asks the state API
# every second whether the run's controller is alive; the state API is served by the dashboard,
# which a local Ray here does not start, so each check failed with "Failed to query Ray Train
# Controller actor state ..." (50 of the first 122 terminal lines of a 4-trial sweep; with this
# hook, 0 in four sweeps' 1,900 lines). Only Ray started here has the hook: a command that joins
# a running Ray (RAY_ADDRESS, a cluster with its dashboard) keeps that Ray's settings. Without the
# state API it cannot do its job (remove a crashed controller's placement group) either way, so
# silencing it loses nothing.
QUIET_WORKER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
WORKER_SETUP_HOOK = "rayseg.raylocal.quiet_worker_logs"


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


def quiet_worker_logs() -> None:
    """Ray's worker_process_setup_hook (WORKER_SETUP_HOOK): runs first in every worker process."""
    for name in QUIET_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_local(**kwargs) -> None:
    """Start an embedded Ray whose servers listen on 127.0.0.1 only (see the module doc), with
    quiet_worker_logs as its workers' setup hook unless runtime_env names another."""
    import ray
    from ray._private import ray_constants

    kwargs.setdefault("include_dashboard", False)
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", WORKER_SETUP_HOOK)
    kwargs["runtime_env"] = runtime_env
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
