"""`rayseg doctor PATH...`: datasets, their partitions, pseudo-label folders, runs and sweeps checked
against their manifests and records in one pass. (It lives above rayseg/data/ because it reads
runs, sweeps and pseudo-label records: rayseg/data/ never imports rayseg.train or rayseg.pseudo.)"""

from __future__ import annotations

import json
from pathlib import Path

from rayseg.data import shards
from rayseg.data.inspect import verify_dataset
from rayseg.data.pseudo_store import META_FILE


def _kind(path: Path) -> str:
    if (path / shards.MANIFEST_NAME).is_file():
        return "dataset"
    if (path / META_FILE).is_file():
        return "pseudo-labels"
    if (path / "sweep.json").is_file():
        return "sweep"
    if (path / "config.toml").is_file():
        return "run"
    return "unknown"


def _check_run(path: Path, checked: set) -> list[tuple[str, Path, list[str], list[str]]]:
    """A run directory: its dataset, its own pseudo_labels/ and (stage seg) the folder it trained on."""
    from rayseg.train.checkpoint import checkpoints
    from rayseg.train.launch import load_run

    cfg = load_run(path)
    ckpts = checkpoints(path)
    notes = [f"{len(ckpts)} checkpoint(s), newest {ckpts[-1].parent.name}" if ckpts else "no checkpoint yet"]
    out = [("run", path, [], notes)]
    targets = [Path(cfg.data.root)]
    if (path / "pseudo_labels").is_dir():
        targets.append(path / "pseudo_labels")
    if cfg.data.pseudo_labels:
        targets.append(Path(cfg.data.pseudo_labels))
    for target in targets:
        out += _check(target, checked)
    return out


def _check_sweep(path: Path) -> tuple[str, Path, list[str], list[str]]:
    from rayseg.train import tune

    sweep = json.loads((path / tune.SWEEP_FILE).read_text())
    points = sweep.get("points", [])
    done = [i for i, p in enumerate(points)
            if (path / tune.TRIALS_DIR / tune.trial_dir_name(i, p) / tune.RESULT_FILE).is_file()]
    problems = []
    if len(done) < len(points):
        todo = [tune.trial_dir_name(i, p) for i, p in enumerate(points) if i not in done]
        problems.append(f"{len(points) - len(done)} of {len(points)} trials unfinished ({', '.join(todo[:4])}"
                        f"{' ...' if len(todo) > 4 else ''}): `rayseg tune {sweep.get('file', 'FILE')} --resume "
                        f"--name {sweep.get('name')}`")
    return ("sweep", path, problems, [f"{len(done)} of {len(points)} trials complete"])


def _check(path: Path, checked: set) -> list[tuple[str, Path, list[str], list[str]]]:
    from rayseg.pseudo import verify_pseudo_labels

    path = Path(path).resolve()
    if path in checked:
        return []
    checked.add(path)
    if not path.exists():
        return [("path", path, [f"{path} does not exist"], [])]
    kind = _kind(path)
    if kind == "dataset":
        notes = []
        if not (path / "partitions.json").is_file():
            regions = sorted({m for e in shards.load_manifest(path)["scenes"] for m in e.get("regions", [])})
            if regions:
                notes.append(f"regions {regions} have no partitions.json: made outside `rayseg partition`, "
                             "parameters unknown")
        return [("dataset", path, verify_dataset(path), notes)]
    if kind == "pseudo-labels":
        try:
            problems, notes = verify_pseudo_labels(path)
        except (FileNotFoundError, shards.ShardError) as exc:
            problems, notes = [f"its dataset: {exc}"], []
        return [("pseudo-labels", path, problems, notes)]
    if kind == "sweep":
        return [_check_sweep(path)]
    if kind == "run":
        return _check_run(path, checked)
    return [("path", path, [f"{path}: not a dataset (manifest.json), pseudo-label folder (pseudo.json), "
                            "run (config.toml) or sweep (sweep.json)"], [])]


def run_doctor(paths: list[str | Path]) -> int:
    """Check each path (a dataset, a pseudo-label folder, a run or a sweep directory) and what
    it refers to (a run's dataset and pseudo-labels), print one section per thing checked.
    Returns 0 when nothing is wrong, 1 otherwise."""
    checked: set = set()
    results = []
    for path in paths:
        results += _check(Path(path), checked)
    bad = 0
    for kind, path, problems, notes in results:
        print(f"{kind} {path}: " + (f"{len(problems)} problem(s)" if problems else "OK"))
        for p in problems:
            print(f"  PROBLEM {p}")
        for n in notes:
            print(f"  note    {n}")
        bad += bool(problems)
    print(f"doctor: {len(results)} checked, {bad} with problems")
    return 1 if bad else 0
