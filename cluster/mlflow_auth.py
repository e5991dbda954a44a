"""Create the credentials of the cluster's MLflow server once: one env file, readable by its owner
only, holding the admin user and password that `mlflow server --app-name basic-auth` creates on
its first start, the secret key its web app signs with, and the same user and password as
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for every client (rayseg's tracker reads
them through MLflow). An existing file is kept: the server's user store already holds its password.

    python cluster/mlflow_auth.py /shared/mlflow/auth.env          # aws-gpu.yaml does this
    python cluster/mlflow_auth.py auth.env && kubectl create secret generic rayseg-mlflow-auth \\
        --from-env-file=auth.env && rm auth.env                    # KubeRay (raycluster.yaml)
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

USER = "admin"


def write_auth_env(path: str | Path) -> bool:
    """Write the env file at `path` unless it exists; True when it was written."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    text = (f"MLFLOW_AUTH_ADMIN_USERNAME={USER}\nMLFLOW_AUTH_ADMIN_PASSWORD={password}\n"
            f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n"
            f"MLFLOW_TRACKING_USERNAME={USER}\nMLFLOW_TRACKING_PASSWORD={password}\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # all or nothing: a half-written file would lock the server out
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} ENV_FILE")
    print(f"{sys.argv[1]}: {'written' if write_auth_env(sys.argv[1]) else 'exists, kept'}")
