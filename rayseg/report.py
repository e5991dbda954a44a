"""`rayseg report`: an ablation sweep's table in the paper's layout, read back from MLflow.

For each MLflow experiment named on the command line, the newest sweep (the parent run
`rayseg tune` made; or the one named with --sweep) gives the rows: one per grid point, in the
sweep's order, with the varied config values as the first columns. The metric columns are the
pseudo-label mIoU on the train split, 3D and 2D, at the end of each trial, and the val mIoU of
stage seg when the sweep ran it (tune.with_seg). Values come from each trial's child run as
logged; a trial that did not finish shows '-'.

Written to --out (one folder per experiment) and logged as artifacts of the sweep's parent run
under report/: report.md, report.csv, a plot (mIoU vs the numeric grid key, one line per
combination of the others, e.g. eta per strategy for Table 8; bars otherwise) and the per-class
IoU of the best trial. "Best" is by pseudo-label mIoU, which is measured against ground truth:
it is for reporting only and never selects a model.

ORACLE rows: every stage-seg run of the experiment tagged rayseg.oracle=true (`rayseg segment` on a
`rayseg oracle-labels` folder: the same network and steps trained on ground-truth labels) is added
below the trials, marked ORACLE, with its val mIoU once `rayseg evaluate` logged it: the fully
supervised upper bound, never a weakly supervised result (and never the "best trial").
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (MLflow metric of a trial's child run, column title). Logged by rayseg.train.tune.finish_trial.
METRICS = (("pseudo_final_3d_miou", "pseudo-label 3D mIoU"), ("pseudo_final_2d_miou", "pseudo-label 2D mIoU"),
           ("val_3d_miou", "val 3D mIoU"))
BEST_BY = "pseudo_final_3d_miou"
ORACLE_NOTE = ("ORACLE rows: the same segmentation network and steps trained on ground-truth labels "
               "(`rayseg oracle-labels` + `rayseg segment`): a fully supervised upper bound, not a weakly "
               "supervised result")
SELECTION_NOTE = ("best trial selected by pseudo-label mIoU, a metric computed against ground truth: "
                  "for reporting only, never for model selection")


class ReportError(ValueError):
    """The tracking store, experiment or sweep asked for does not exist."""


@dataclass
class Row:
    """One grid point and what its trial logged."""

    index: int
    point: dict[str, Any]
    run_id: str | None = None
    status: str = "missing"
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OracleRow:
    """A stage-seg run trained on ground-truth labels (tagged rayseg.oracle=true) and its metrics."""

    run_id: str
    name: str
    what: str
    status: str
    run_dir: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SweepTable:
    experiment: str
    sweep: str
    parent_run_id: str
    grid_keys: list[str]
    rows: list[Row]
    other_sweeps: list[str]
    oracle_rows: list[OracleRow] = field(default_factory=list)

    @property
    def metric_keys(self) -> list[str]:
        """The metric columns some trial (or ORACLE row) has (val only when stage seg ran)."""
        return [m for m, _ in METRICS if any(m in r.metrics for r in [*self.rows, *self.oracle_rows])]


# --------------------------------------------------------------------------------------------
# Reading MLflow
# --------------------------------------------------------------------------------------------


def open_store(tracking_uri: str):
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():  # MLflow would silently create an empty store
            raise ReportError(f"tracking store {path} does not exist (pass --tracking-uri)")
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def load_sweep(client, experiment: str, sweep: str | None = None) -> SweepTable:
    """The rows of the newest sweep (or the sweep named `sweep`) of an MLflow experiment."""
    from rayseg.train import tune

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no MLflow experiment {experiment!r} in this store (it has: {', '.join(names) or 'none'})")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.{tune.TAG_ROLE} = 'parent'",
                                 order_by=["attributes.start_time DESC"])
    if sweep is not None:
        parents = [p for p in parents if p.data.tags.get(tune.TAG_SWEEP) == sweep] + \
                  [p for p in parents if p.data.tags.get(tune.TAG_SWEEP) != sweep]
        if not parents or parents[0].data.tags.get(tune.TAG_SWEEP) != sweep:
            raise ReportError(f"experiment {experiment!r} has no sweep named {sweep!r}")
    if not parents:
        raise ReportError(f"experiment {experiment!r} has no sweep (no run tagged {tune.TAG_ROLE}=parent; "
                          f"run `rayseg tune` first)")
    parent = parents[0]
    params = parent.data.params
    points = {int(k.split("/", 1)[1]): json.loads(v) for k, v in params.items() if re.fullmatch(r"trial/\d+", k)}
    rows = {i: Row(index=i, point=points[i]) for i in sorted(points)}
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    for child in children:
        tags = child.data.tags
        if tags.get(tune.TAG_SUPERSEDED) == "true":
            continue
        index = tags.get(tune.TAG_TRIAL)
        if index is None:  # a trial interrupted before it was tagged: its run name starts with tNNN
            match = re.match(r"t(\d+)", child.info.run_name or "")
            index = match.group(1) if match else None
        if index is None or int(index) not in rows:
            continue
        row = rows[int(index)]
        row.run_id, row.status, row.metrics = child.info.run_id, child.info.status, dict(child.data.metrics)
    return SweepTable(experiment=experiment, sweep=parent.data.tags.get(tune.TAG_SWEEP, parent.info.run_name),
                      parent_run_id=parent.info.run_id, grid_keys=json.loads(parent.data.tags.get(tune.TAG_GRID_KEYS, "[]")),
                      rows=list(rows.values()),
                      other_sweeps=[p.data.tags.get(tune.TAG_SWEEP, p.info.run_name) for p in parents[1:]],
                      oracle_rows=load_oracle_rows(client, exp.experiment_id))


def load_oracle_rows(client, experiment_id: str) -> list[OracleRow]:
    """The experiment's stage-seg runs tagged rayseg.oracle=true (trained on ground-truth labels),
    oldest first."""
    runs = client.search_runs([experiment_id], filter_string="tags.rayseg.oracle = 'true' and tags.rayseg.stage = 'seg'",
                              order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        tags = run.data.tags
        run_dir = tags.get("rayseg.run_dir", "")
        out.append(OracleRow(run_id=run.info.run_id, name=Path(run_dir).name if run_dir else run.info.run_name,
                             what=tags.get("rayseg.oracle_what", "ground truth"), status=run.info.status,
                             run_dir=run_dir, metrics=dict(run.data.metrics)))
    return out


def best_row(table: SweepTable) -> Row | None:
    done = [r for r in table.rows if BEST_BY in r.metrics]
    return max(done, key=lambda r: r.metrics[BEST_BY]) if done else None


def per_class(row: Row, metric_keys: list[str]) -> list[dict[str, Any]]:
    """[{"class", "<metric prefix>": IoU, ...}] from a run's '<prefix>_iou/<class>' metrics."""
    prefixes = [m[: -len("_miou")] for m in metric_keys]
    classes = list(dict.fromkeys(k.split("/", 1)[1] for k in row.metrics
                                 for p in prefixes if k.startswith(f"{p}_iou/")))
    return [{"class": c, **{p: row.metrics.get(f"{p}_iou/{c}") for p in prefixes}} for c in classes]


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _short_key(key: str) -> str:
    """'loss.rpc.eta' -> 'rpc.eta' (the last two parts say what varies)."""
    return ".".join(key.split(".")[-2:])


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and os.sep in value:
        return Path(value).name
    return str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _value(row: Row, key: str, base: dict[str, Any]) -> Any:
    """A row's value of a grid key: its point's, else the sweep's base value (rows may set
    different keys)."""
    return row.point.get(key, base.get(key, ""))


def _base_values(client, table: SweepTable) -> dict[str, Any]:
    """The parent's base config params of the grid keys, parsed like --set values."""
    from rayseg.config import parse_override

    params = client.get_run(table.parent_run_id).data.params
    out = {}
    for key in table.grid_keys:
        if key in params:
            text = params[key]
            text = text.lower() if text in ("True", "False") else text  # str(bool) -> TOML
            out[key] = parse_override(f"{key}={text}")[1]
    return out


def markdown(table: SweepTable, base: dict[str, Any]) -> str:
    metric_keys = table.metric_keys
    titles = dict(METRICS)
    done = sum(1 for r in table.rows if r.metrics.get(BEST_BY) is not None)
    head = [_short_key(k) for k in table.grid_keys] + [titles[m] for m in metric_keys]
    lines = [f"## {table.experiment}", "",
             f"Sweep `{table.sweep}`: {done} of {len(table.rows)} trials complete. mIoU in %, pseudo-labels "
             f"on the train split (measured against ground truth, evaluation only).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in table.rows:
        cells = [_cell(_value(r, k, base)) for k in table.grid_keys] + [_percent(r.metrics.get(m)) for m in metric_keys]
        lines.append("| " + " | ".join(cells) + " |")
    for o in table.oracle_rows:
        label = [f"**ORACLE** ({o.what}, {o.name})"] + [""] * (len(table.grid_keys) - 1) if table.grid_keys else []
        lines.append("| " + " | ".join(label + [_percent(o.metrics.get(m)) for m in metric_keys]) + " |")
    if table.oracle_rows:
        lines += ["", ORACLE_NOTE + "."]
        unevaluated = [o for o in table.oracle_rows if "val_3d_miou" not in o.metrics]
        if unevaluated:
            lines.append("ORACLE runs without a val mIoU yet: " + ", ".join(
                f"{o.name} ({o.status.lower()}; `rayseg evaluate {o.run_dir or o.name} --split val`)" for o in unevaluated))
    incomplete = [f"t{r.index:03d} ({r.status.lower()})" for r in table.rows if r.metrics.get(BEST_BY) is None]
    if incomplete:  # never run, still running, stopped early by ASHA, or failed
        lines += ["", "Trials without a final result: " + ", ".join(incomplete)]
    best = best_row(table)
    if best is not None:
        lines += ["", f"Per-class IoU (%) of the best trial, t{best.index:03d} "
                      f"({', '.join(f'{_short_key(k)}={_cell(v)}' for k, v in best.point.items())}); {SELECTION_NOTE}.", ""]
        classes = per_class(best, metric_keys)
        prefixes = [m[: -len("_miou")] for m in metric_keys]
        lines += ["| class | " + " | ".join(titles[p + "_miou"].replace(" mIoU", " IoU") for p in prefixes) + " |",
                  "|---|" + "|".join("---" for _ in prefixes) + "|"]
        for c in classes:
            lines.append(f"| {c['class']} | " + " | ".join(_percent(c[p]) for p in prefixes) + " |")
    if table.other_sweeps:
        lines += ["", f"Other sweeps in this experiment (pick one with --sweep): {', '.join(table.other_sweeps)}"]
    return "\n".join(lines) + "\n"


def csv_rows(table: SweepTable, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per grid point: experiment, sweep, trial, the grid keys (full dotted names), the
    run id and status, and the metrics exactly as logged (fractions, not percent)."""
    out = []
    for r in table.rows:
        row = {"experiment": table.experiment, "sweep": table.sweep, "trial": r.index}
        row.update({k: _value(r, k, base) for k in table.grid_keys})
        row.update({"run_id": r.run_id or "", "status": r.status})
        row.update({m: r.metrics.get(m, "") for m, _ in METRICS})
        out.append(row)
    for o in table.oracle_rows:  # trained on ground truth: the upper bound, marked
        row = {"experiment": table.experiment, "sweep": table.sweep, "trial": "ORACLE"}
        row.update({k: "" for k in table.grid_keys})
        row.update({"run_id": o.run_id, "status": o.status})
        row.update({m: o.metrics.get(m, "") for m, _ in METRICS})
        row.update({"oracle": f"ORACLE: {o.what}", "run_dir": o.run_dir})
        out.append(row)
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _numeric_axis(table: SweepTable, base: dict[str, Any]) -> str | None:
    """A grid key with at least 3 distinct numbers (eta, views): the x axis of a line plot."""
    for key in table.grid_keys:
        values = [_value(r, key, base) for r in table.rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) >= 3:
            return key
    return None


def plot(table: SweepTable, base: dict[str, Any], path: Path) -> Path:
    """Line plot of mIoU vs the numeric grid key (one line per combination of the other keys),
    or grouped bars per grid point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_keys = table.metric_keys
    titles = dict(METRICS)
    x_key = _numeric_axis(table, base)
    if x_key is not None:
        others = [k for k in table.grid_keys if k != x_key]
        fig, axes = plt.subplots(1, max(1, len(metric_keys)), figsize=(5.5 * max(1, len(metric_keys)), 4),
                                 squeeze=False)
        for ax, metric in zip(axes[0], metric_keys or [BEST_BY]):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in table.rows:
                label = ", ".join(f"{_short_key(k)}={_cell(_value(r, k, base))}" for k in others) or table.experiment
                if metric in r.metrics:
                    series.setdefault(label, []).append((_value(r, x_key, base), 100 * r.metrics[metric]))
            for label, points in series.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            oracles = [o for o in table.oracle_rows if metric in o.metrics]
            for o in oracles:  # the fully supervised upper bound, as a level line
                ax.axhline(100 * o.metrics[metric], color="k", linestyle="--", linewidth=1, label=f"ORACLE ({o.what})")
            ax.set_xlabel(_short_key(x_key))
            ax.set_ylabel(f"{titles[metric]} (%)")
            ax.grid(alpha=0.3)
            if series or oracles:
                ax.legend(fontsize=7)
        fig.suptitle(f"{table.experiment}: mIoU vs {_short_key(x_key)}")
    else:
        import numpy as np

        labels = [f"t{r.index:03d}\n" + "\n".join(_cell(_value(r, k, base)) for k in table.grid_keys) for r in table.rows]
        labels += [f"ORACLE\n{o.what}" for o in table.oracle_rows]
        bars = [*table.rows, *table.oracle_rows]
        x = np.arange(len(bars))
        width = 0.8 / max(1, len(metric_keys))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars) + 2), 4.5))
        for i, metric in enumerate(metric_keys):
            values = [100 * r.metrics[metric] if metric in r.metrics else 0.0 for r in bars]
            ax.bar(x + (i - (len(metric_keys) - 1) / 2) * width, values, width, label=titles[metric])
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("mIoU (%)")
        ax.grid(axis="y", alpha=0.3)
        if metric_keys:
            ax.legend(fontsize=8)
        ax.set_title(f"{table.experiment}: " + ", ".join(_short_key(k) for k in table.grid_keys))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def run_report(tracking_uri: str, experiments: list[str], fmt: str = "markdown", out: str | Path = "runs/reports",
               sweep: str | None = None, log: bool = True) -> dict:
    """Build, write and (log=True) log the report of each experiment. Returns {"text": what to
    print, "files": {experiment: [paths]}, "tables": {experiment: SweepTable}}."""
    if fmt not in ("markdown", "csv"):
        raise ReportError(f"--format must be markdown or csv, got {fmt!r}")
    client = open_store(tracking_uri)
    texts, all_rows, files, tables = [], [], {}, {}
    for name in experiments:
        table = load_sweep(client, name, sweep)
        base = _base_values(client, table)
        folder = Path(out) / name
        md, rows = markdown(table, base), csv_rows(table, base)
        written = [_write(folder / "report.md", md), _write(folder / "report.csv", to_csv(rows)),
                   plot(table, base, folder / f"{name}.png")]
        best = best_row(table)
        if best is not None:
            per = [{"experiment": name, "trial": best.index, "run_id": best.run_id, **c}
                   for c in per_class(best, table.metric_keys)]
            written.append(_write(folder / "best_per_class_iou.csv", to_csv(per)))
            written += _best_trial_renders(client, best, folder / "renders")
        if log:
            for path in written:
                client.log_artifact(table.parent_run_id, str(path), "report")
        texts.append(md)
        all_rows += rows
        files[name], tables[name] = written, table
    text = "\n".join(texts) if fmt == "markdown" else to_csv(all_rows)
    return {"text": text, "files": files, "tables": tables}


def _best_trial_renders(client, best: Row, out: Path, num_scenes: int = 2) -> list[Path]:
    """PNG renders (top-down + oblique; GT vs pseudo-labels vs predictions) of a few train scenes
    of the best trial, when its run directory (MLflow tag rayseg.run_dir) is reachable here."""
    from rayseg.export import ExportError, render_run_scenes

    if best.run_id is None:
        return []
    run_dir = client.get_run(best.run_id).data.tags.get("rayseg.run_dir")
    if not run_dir or not Path(run_dir).is_dir():
        print(f"report: no renders: the best trial's run directory {run_dir!r} is not reachable from here")
        return []
    try:
        return list(render_run_scenes(run_dir, out, num_scenes=num_scenes, split="train"))
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"report: no renders for {run_dir}: {exc}")
        return []
