"""`rayseg demo` end to end (the README's main command) on a tiny version of the demo config:
synthetic data -> partition -> cmg -> cmg_rpc -> pseudo-labels -> seg -> val tables."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_chain(tmp_path):
    from rayseg.demo import DEFAULT_CONFIG  # what `rayseg demo` runs, made tiny below

    cfg = tmp_path / "tiny-demo.toml"
    cfg.write_text(f"""extends = "{DEFAULT_CONFIG}"
[synthetic]
num_scenes = 5
val_fraction = 0.4
num_views = 2
image_width = 64
image_height = 48
min_points = 2000
max_points = 3000
points_per_m2 = 30.0
[data]
root = "{tmp_path / 'data'}"
image_width = 64
image_height = 48
monitor_scenes = 1
voxel_size = 0.1
[optim]
batch_size = 2
cmg_epochs = 1
cmg_rpc_epochs = 1
seg_epochs = 1
seg_voxel_size = 0.1
[tracking]
runs_dir = "{tmp_path / 'runs'}"
""")
    out = subprocess.run([sys.executable, "-m", "rayseg", "demo", "--config", str(cfg)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert f"=== {step}" in out.stdout
    assert "pseudo-labels vs GT, train split" in out.stdout and "mIoU" in out.stdout
    assert "final val mIoU (3D)" in out.stdout and "mlflow ui --backend-store-uri sqlite:///" in out.stdout
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    assert len(list((tmp_path / "runs").glob("synthetic-demo-s3dis-train-*/pseudo_labels/train/*.parquet"))) == 3
    # MLflow: one demo run, its stages as children, the final numbers on it
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("synthetic-demo-s3dis")
    (demo,) = client.search_runs([exp.experiment_id], filter_string="tags.rayseg.pipeline = 'demo'")
    stages = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{demo.info.run_id}'")
    assert sorted(r.info.run_name for r in stages) == ["cmg", "cmg_rpc", "pseudo_label", "seg"]
    assert demo.info.status == "FINISHED" and {"pseudo_final_3d_miou", "val_3d_miou"} <= set(demo.data.metrics)
