"""The data pipeline end to end on small shards: the batch contract, teacher/student point
identity, Ray Data == plain loop, no ground truth in train mode, named errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayseg import config as cfgmod
from rayseg.data import pipeline as P
from rayseg.data import shards
from rayseg.data.linking import link_points
from rayseg.data.scene import SCANNET20, SceneError
from test_transforms import FLOOR, WALL, room_scene, small_config

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """5 train + 2 val rooms as real shards with a manifest."""
    root = tmp_path_factory.mktemp("pipeline") / "ds"
    for i in range(7):
        scene = room_scene(f"scene{i:02d}", seed=10 + i, num_views=5, table=i % 2 == 0)
        scene["split"] = "train" if i < 5 else "val"
        shards.write_scene(root, scene)
    shards.write_manifest(root, "scannet20")
    return root


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def plan_batches(root, split, cfg, mode, epoch=0, seed=None, batch_size=None, loader="local"):
    """pipeline.batches of a whole pass (seed and batch size default to the config's)."""
    seed = cfg.seed if seed is None else seed
    p = P.plan(root, split, cfg, mode, epoch, seed)
    return P.batches(p, cfg, epoch, seed, batch_size or cfg.optim.batch_size, loader=loader)


def _point_positions(coord: np.ndarray, inverse: np.ndarray, voxel: float) -> np.ndarray:
    return (coord[inverse, 1:].astype(np.float64) + 0.5) * voxel


def _similarity_residual(src: np.ndarray, dst: np.ndarray) -> float:
    """Max residual of the best affine fit dst ~ A src + b."""
    X = np.concatenate([src, np.ones((len(src), 1))], 1)
    sol, *_ = np.linalg.lstsq(X, dst, rcond=None)
    return float(np.abs(X @ sol - dst).max())


def check_contract(batch: dict, cfg, mode: str) -> None:
    """Dtypes, shapes and offset consistency of the BATCH CONTRACT."""
    h, w = cfg.data.image_height, cfg.data.image_width
    sides = [""] + (["teacher_"] if mode == "train" else [])
    for s in sides:
        b = len(batch[s + "scene_id"])
        coord, feat, inverse = batch[s + "coord"], batch[s + "feat"], batch[s + "inverse"]
        assert coord.dtype == np.int32 and coord.shape[1] == 4 and coord[:, 1:].min() >= 0
        assert feat.dtype == np.float32 and feat.shape == (coord.shape[0], 6)
        assert np.abs(feat[:, :3]).max() <= 1.0 + 1e-6
        for key in ("offset", "point_offset", "view_offset"):
            assert batch[s + key].dtype == np.int64 and batch[s + key].shape == (b,)
        assert batch[s + "offset"][-1] == coord.shape[0]
        assert batch[s + "point_offset"][-1] == inverse.shape[0] == batch[s + "region"].shape[0]
        starts = np.concatenate([[0], batch[s + "offset"][:-1]])
        np.testing.assert_array_equal(coord[starts, 0], np.arange(b))  # batch index column
        pstarts = np.concatenate([[0], batch[s + "point_offset"]])
        for i in range(b):  # each sample's points map into its own voxels
            inv = inverse[pstarts[i]:pstarts[i + 1]]
            assert inv.min() >= starts[i] and inv.max() < batch[s + "offset"][i]
        images = batch[s + "images"]
        assert images.dtype == np.float32 and images.shape == (batch[s + "view_offset"][-1], 3, h, w)
        assert batch[s + "view_region"].shape == (images.shape[0], h, w)
        assert batch[s + "view_region"].dtype == np.int64 and batch[s + "region"].dtype == np.int64
        assert batch[s + "tags"].dtype == np.float32 and batch[s + "tags"].shape == (b, len(SCANNET20))
        lp, lv, lx = batch[s + "link_point"], batch[s + "link_view"], batch[s + "link_pixel"]
        assert lp.dtype == lv.dtype == lx.dtype == np.int64 and lp.shape == lv.shape == lx.shape
        assert lp.size > 0 and lp.max() < inverse.shape[0] and lv.max() < images.shape[0] and lx.max() < h * w
        # a link joins a point and a view of the same sample
        vstarts = np.concatenate([[0], batch[s + "view_offset"]])
        np.testing.assert_array_equal(np.searchsorted(pstarts, lp, "right"), np.searchsorted(vstarts, lv, "right"))
    if mode == "eval":
        assert batch["label"].dtype == np.int64 and batch["label"].shape == batch["inverse"].shape
        assert batch["view_label"].shape == batch["view_region"].shape
    else:
        assert "label" not in batch and "view_label" not in batch


def test_teacher_and_student_are_the_same_points(dataset):
    cfg = small_config(**{"augment.remove_floor_p": 1.0, "augment.remove_wall_p": 0.0, "data.max_points": 2500,
                          "augment.mix3d": True})
    batch = next(plan_batches(dataset, "train", cfg, "train", epoch=0, batch_size=4))
    check_contract(batch, cfg, "train")
    assert len(batch["scene_id"]) == 2 and len(batch["teacher_scene_id"]) == 4  # two Mix3D pairs
    assert batch["scene_id"][0] == "+".join(batch["teacher_scene_id"][:2])
    np.testing.assert_array_equal(batch["teacher_point_offset"][1::2], batch["point_offset"])
    for key in ("region", "view_region", "link_point", "link_view", "link_pixel"):
        np.testing.assert_array_equal(batch[key], batch["teacher_" + key])
    assert batch["teacher_tags"][:, FLOOR].max() == 0  # removal happened before the split
    np.testing.assert_array_equal(batch["tags"][0], batch["teacher_tags"][:2].max(0))
    # augment.removal_2d: the floor's pixels leave the 2D pooling and the views' tag is cleared too
    np.testing.assert_array_equal(batch["view_tags"], batch["tags"])
    np.testing.assert_array_equal(batch["view_valid"], batch["teacher_view_valid"])
    assert batch["view_valid"].shape == batch["view_region"].shape and batch["view_valid"].dtype == bool
    assert 0.05 < 1 - batch["view_valid"].mean() < 0.6  # the camera looks down: floor, not everything
    kept = small_config(**{"augment.remove_floor_p": 1.0, "augment.remove_wall_p": 0.0, "data.max_points": 2500,
                           "augment.mix3d": True, "augment.removal_2d": False})
    reference = next(plan_batches(dataset, "train", kept, "train", epoch=0, batch_size=4))
    assert reference["view_tags"][:, FLOOR].min() == 1 and reference["view_valid"].all()  # views show the floor
    np.testing.assert_array_equal(reference["teacher_tags"], batch["teacher_tags"])
    voxel = cfg.data.voxel_size
    student = _point_positions(batch["coord"], batch["inverse"], voxel)
    teacher = _point_positions(batch["teacher_coord"], batch["teacher_inverse"], voxel)
    bounds = np.concatenate([[0], batch["teacher_point_offset"]])
    for i in range(4):  # per scene: the student is a similarity transform of the teacher
        sl = slice(bounds[i], bounds[i + 1])
        assert bounds[i + 1] - bounds[i] <= 2500
        assert _similarity_residual(teacher[sl], student[sl]) < 4 * voxel
        shuffled = np.random.default_rng(0).permutation(bounds[i + 1] - bounds[i])
        assert _similarity_residual(teacher[sl][shuffled], student[sl]) > 0.5  # a wrong order fails


def test_eval_mode_is_deterministic_unaugmented_and_reads_labels(dataset):
    cfg = small_config()
    first = list(plan_batches(dataset, "val", cfg, "eval", epoch=0, seed=1, batch_size=2))
    again = list(plan_batches(dataset, "val", cfg, "eval", epoch=3, seed=2, batch_size=2))
    assert len(first) == 1 and first[0]["scene_id"] == ["scene05", "scene06"]
    check_contract(first[0], cfg, "eval")
    for k, v in first[0].items():
        assert np.array_equal(v, again[0][k]) if isinstance(v, np.ndarray) else v == again[0][k]
    scene = shards.read_scene(dataset / "val" / "scene05.parquet")
    n = scene["coord"].shape[0]
    np.testing.assert_array_equal(first[0]["label"][:n], scene["label"])
    # eval views are the first of each chunk: 5 views in 3 chunks -> views 0, 2, 4
    p = P.plan(dataset, "val", cfg, "eval")
    sample = P.read_sample(p.paths[0], p, cfg, 0, cfg.seed)
    idx, _ = link_points(scene["coord"], scene["view_depth"][2], scene["view_pose"][2],
                           scene["view_intrinsics"][2], cfg.data.voxel_size)
    np.testing.assert_array_equal(sample["link_point"][sample["link_view"] == 1], idx)


def test_ray_data_gives_the_plain_loop_batches(dataset, ray_local):
    cfg = small_config(**{"augment.remove_floor_p": 0.5, "augment.remove_wall_p": 0.5})
    for mode, split in (("train", "train"), ("eval", "val")):
        plain = list(plan_batches(dataset, split, cfg, mode, epoch=2, seed=7, batch_size=2))
        via_ray = list(plan_batches(dataset, split, cfg, mode, epoch=2, seed=7, batch_size=2, loader="ray"))
        assert len(plain) == len(via_ray) > 0
        for a, b in zip(plain, via_ray):
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], np.ndarray):
                    assert a[k].dtype == b[k].dtype, k
                    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
                else:
                    assert a[k] == b[k], k
    # a different epoch reorders the scenes and draws other augmentations
    other = next(plan_batches(dataset, "train", cfg, "train", epoch=3, seed=7, batch_size=5))
    this = next(plan_batches(dataset, "train", cfg, "train", epoch=2, seed=7, batch_size=5))
    assert other["teacher_scene_id"] != this["teacher_scene_id"]


def test_ray_pass_stream_gives_each_epochs_plain_batches(dataset, ray_local, capsys):
    """Training's Ray Data stream: one dataset over several epochs (no rebuild per epoch) gives
    each epoch exactly the plain loop's batches of that epoch, asked for in order only; and
    Ray Data prints no per-dataset banner."""
    cfg = small_config()
    epochs = [4, 5, 6]
    plans = [(e, P.plan(dataset, "train", cfg, "train", e, 7)) for e in epochs]
    stream = P.RayPassStream(plans, cfg, seed=7, batch_size=2, window_scenes=10)  # windows [4, 5], [6]
    with pytest.raises(P.PipelineError, match="epoch 5 requested"):
        next(stream.batches(5))
    for epoch in epochs:
        plain = list(plan_batches(dataset, "train", cfg, "train", epoch=epoch, seed=7, batch_size=2))
        via_ray = list(stream.batches(epoch))
        assert [b["teacher_scene_id"] for b in via_ray] == [b["teacher_scene_id"] for b in plain]
        for a, b in zip(plain, via_ray):
            for k in a:
                if isinstance(a[k], np.ndarray):
                    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert len(plain) == 3  # 5 scenes in batches of 2
    out = capsys.readouterr()
    assert "Starting execution" not in out.out + out.err and "Execution plan" not in out.out + out.err


def _corrupt_labels(src, dst):
    """Copy of the dataset whose GT columns hold undecodable bytes."""
    shutil.copytree(src, dst)
    for path in sorted((dst / "train").glob("*.parquet")):
        table = pq.read_table(path)
        for col in ("label", "instance"):
            i = table.column_names.index(col)
            table = table.set_column(i, col, pa.array([b"not an array"], pa.binary()))
        i = table.column_names.index("view_label")
        table = table.set_column(i, "view_label", pa.array([[b"not a png"] * 5], pa.list_(pa.binary())))
        pq.write_table(table, path)
    shards.write_manifest(dst, None)
    return dst


def test_train_mode_never_reads_ground_truth(dataset, tmp_path, ray_local):
    root = _corrupt_labels(dataset, tmp_path / "corrupt")
    cfg = small_config()
    assert not set(P.plan(root, "train", cfg, "train").columns) & {"label", "instance", "view_label"}
    assert not set(P.plan(root, "train", cfg, "infer").columns) & {"label", "instance", "view_label"}
    batches = list(plan_batches(root, "train", cfg, "train", batch_size=5))
    assert len(batches) == 1 and "label" not in batches[0]
    rows = list(P.ray_samples([(0, P.plan(root, "train", cfg, "infer"))], cfg, cfg.seed).iter_rows())
    assert len(rows) == 5 and "label" not in rows[0]
    with pytest.raises(shards.ShardError, match="label"):
        next(plan_batches(root, "train", cfg, "eval"))


def test_named_errors(dataset, tmp_path):
    cfg = small_config(**{"data.region_column": "vccs"})
    with pytest.raises(P.PipelineError) as err:
        plan_batches(dataset, "train", cfg, "train", loader="ray")  # fails before Ray is touched
    msg = str(err.value)
    assert "region_vccs" in msg and str(dataset) in msg and "region_test" in msg and "coord" in msg
    with pytest.raises(FileNotFoundError, match="nowhere"):
        P.plan(tmp_path / "nowhere", "train", small_config(), "train")
    with pytest.raises(P.PipelineError, match="no scenes in split 'test'"):
        P.plan(dataset, "test", small_config(), "train")
    with pytest.raises(P.PipelineError, match="mode"):
        P.plan(dataset, "train", small_config(), "training")
    with pytest.raises(P.PipelineError, match="loader must be one of"):
        plan_batches(dataset, "train", small_config(), "train", loader="threads")
    empty = room_scene("empty")
    for k in ("coord", "color", "normal", "label", "instance"):
        empty[k] = empty[k][:0]
    empty["region_test"] = empty["region_test"][:0]
    with pytest.raises(SceneError, match="scene empty: coord: scene has zero points"):
        P.make_sample(empty, small_config(), np.random.default_rng(0), "train", SCANNET20)
    no_views = room_scene("blind")
    no_views["view_pose"][:] = np.inf
    with pytest.raises(SceneError, match="scene blind: no valid view"):
        P.make_sample(no_views, small_config(), np.random.default_rng(0), "train", SCANNET20)
    no_region = room_scene("plain")
    del no_region["region_test"]
    with pytest.raises(SceneError, match="scene plain: region_test"):
        P.make_sample(no_region, small_config(), np.random.default_rng(0), "train", SCANNET20)


def test_a_plan_restricted_to_some_shards_keeps_their_scene_ids(dataset, tmp_path):
    p = P.plan(dataset, "train", small_config(), "train", epoch=0, seed=3)
    some = p.paths[::-2]
    sub = p.only(some)
    assert sub.paths == some and sub.columns == p.columns and sub.class_names == p.class_names
    assert sub.scene_ids == [p.scene_ids[p.paths.index(x)] for x in some]
    assert p.only([]).paths == [] and p.only([]).scene_ids == []
    with pytest.raises(P.PipelineError, match="not shards of this plan's split 'train'"):
        p.only([tmp_path / "elsewhere.parquet"])


def test_wall_removal_and_no_views(dataset):
    cfg = small_config(**{"augment.remove_wall_p": 1.0, "data.num_views": 0, "augment.mix3d": False})
    batch = next(plan_batches(dataset, "train", cfg, "train", batch_size=2))
    assert batch["tags"][:, WALL].max() == 0 and batch["images"].shape == (0, 3, 24, 32)
    assert batch["link_point"].size == 0 and len(batch["scene_id"]) == 2
    # all wall points (regions 1-4) are gone: nothing left within 0.05 m of the x = 0 wall plane
    scene = shards.read_scene(dataset / "train" / f"{batch['scene_id'][0]}.parquet")
    kept = (scene["region_test"] < 1) | (scene["region_test"] > 4)
    assert batch["point_offset"][0] == kept.sum()


def test_decoding_only_the_chosen_views_changes_nothing(dataset):
    """The loaders choose views from the poses and decode only those images; make_sample on the
    fully decoded scene with the same generator gives the same sample."""
    cfg = small_config(**{"augment.remove_floor_p": 0.5})
    p = P.plan(dataset, "train", cfg, "train", epoch=1, seed=3)
    for path in p.paths[:2]:
        sample = P.read_sample(path, p, cfg, 1, 3)
        scene = shards.read_scene(path, p.columns)
        assert scene["view_rgb"].shape[0] == 5 and sample["images"].shape[0] == 3
        ref = P.make_sample(scene, cfg, P.scene_rng(3, 1, scene["scene_id"]), "train", SCANNET20)
        assert ref.keys() == sample.keys()
        for k in ref:
            assert np.array_equal(ref[k], sample[k]) if isinstance(ref[k], np.ndarray) else ref[k] == sample[k], k


@pytest.mark.timeout(120)
def test_ray_data_runs_beside_training_workers(dataset, ray_local):
    """2 CPUs, one held as by two training workers of 0.5 CPU (ray.cpus_per_worker): the
    pipeline still streams (Ray Data read tasks need one whole free CPU)."""

    @ray_local.remote(num_cpus=0.5)
    class Worker:
        def ping(self) -> int:
            return 1

    workers = [Worker.remote() for _ in range(2)]
    ray_local.get([w.ping.remote() for w in workers])
    try:
        batches = list(plan_batches(dataset, "val", small_config(), "infer", batch_size=2, loader="ray"))
        assert [b["scene_id"] for b in batches] == [["scene05", "scene06"]]
    finally:
        for w in workers:
            ray_local.kill(w)


def test_stream_command(dataset, capsys):
    from rayseg import cli

    sets = ["--set", f"data.root={dataset}", "--set", "data.region_column=test", "--set", "data.num_views=3",
            "--set", "data.image_width=32", "--set", "data.image_height=24", "--set", "optim.batch_size=2"]
    assert cli.main(["stream", *sets, "--mode", "eval"]) == 0
    out = capsys.readouterr().out
    assert "batch 1: scenes ['scene05', 'scene06']" in out and "2 scenes in" in out
    assert cli.main(["stream", *sets, "--set", "data.region_column=vccs"]) == 2
    assert "region_vccs" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_ray_data_tasks_ask_for_ray_data_task_cpus(dataset, ray_local):
    """With 1.5 of the 2 CPUs held, a sample task that asks for a whole CPU cannot start (Ray Data
    waits for one forever); at ray.data_task_cpus = 0.25 the same pass streams."""
    import ray

    @ray_local.remote(num_cpus=1.5)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    ray_local.get(holder.ping.remote())
    try:
        cfg = cfgmod.replace(small_config(), **{"ray.data_task_cpus": 0.25})
        batches = list(plan_batches(dataset, "val", cfg, "infer", batch_size=2, loader="ray"))
        assert [b["scene_id"] for b in batches] == [["scene05", "scene06"]]
        whole = P.ray_samples([(0, P.plan(dataset, "val", small_config(), "infer"))], small_config(), 0)
        ref = ray.remote(lambda ds: len(list(ds.iter_rows()))).options(num_cpus=0).remote(whole)
        ready, _ = ray.wait([ref], timeout=20)
        assert not ready  # a whole CPU per task: still waiting
        ray_local.cancel(ref, force=True)
    finally:
        ray_local.kill(holder)
