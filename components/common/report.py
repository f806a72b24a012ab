"""The run report: one HTML page (PNG charts embedded, so MLflow's artifact viewer renders it alone) and
the same charts as PNG files, built from what a pipeline run's steps recorded, cached or not.

It reads only the steps' summaries (`pipelines/runner.py` writes them to `summary.json`) and the files
in their cache entries, so a fully cached rerun reports exactly what the run that trained reported:

* the stage-by-stage evaluation table: every metric an evaluation step logged as `eval/<metric>`, with
  `eval_untrained/` (the stage's starting point), `eval_shuffled/` (the same items with another item's
  images) and `eval_gap/` (trained minus shuffled; computed here when only the control was logged)
  beside it when present; evaluation steps whose
  metrics are `<phase>_<metric>` (the ViT retrieval) as a phase x metric table;
* `eval_scores.png`: each score by stage; `training_loss.png`: each trained step's loss per global step,
  raw and smoothed (from its `train_log.jsonl`); `step_times.png`; `data_funnel.png`: samples in, kept
  and dropped by reason per data step, and what the shards hold by task.

    python -m components.common.report runs/pipeline_runs/<run>/summary.json   # rebuild beside it
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common.cache import MANIFEST, Manifest

EVAL_VARIANTS = (("eval_untrained", "untrained"), ("eval", "trained"), ("eval_shuffled", "shuffled images"),
                 ("eval_gap", "gap vs shuffled"))  # eval_gap: trained minus shuffled, as the evaluation logs it
TRAIN_LOG = "train_log.jsonl"
CHARTS = ("eval_scores.png", "training_loss.png", "step_times.png", "data_funnel.png")
COUNT_SUFFIXES = ("_samples", "_tokens", "_skipped", "_images")  # held_out_samples, probe_vit_images, ...
TICKS = (("eval_untrained", "#555555", "untrained"), ("eval_shuffled", "#c44e52", "shuffled images"))


def is_count(metric: str) -> bool:
    """Item counts (`n_caption`, `held_out_samples`, ...) are listed under the scores, never charted."""
    return metric.startswith("n_") or metric.endswith(COUNT_SUFFIXES)


EvalTable = dict[str, dict[str, dict[str, float]]]  # step -> variant prefix -> metric -> value
ANSWER_MODES = ("direct", "thinking")  # the SFT evaluation's `eval_<mode>/`, `eval_<mode>_shuffled/`, `eval_<mode>_gap/`


def split_modes(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """An evaluation's metrics per answer mode ("" for a stage's, "direct" and "thinking" for the SFT
    evaluation's), each with the plain variant prefixes (`eval/`, `eval_shuffled/`, `eval_gap/`)."""
    modes: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        prefix, slash, metric = key.partition("/")
        mode = ""
        for name in ANSWER_MODES:
            if prefix == f"eval_{name}" or prefix.startswith(f"eval_{name}_"):
                mode, prefix = name, "eval" + prefix[len(f"eval_{name}"):]
        modes.setdefault(mode, {})[f"{prefix}{slash}{metric}"] = value
    return modes


def eval_table(steps: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], EvalTable]:
    """(evaluation step names, metric names (scores, then counts), step -> variant prefix -> metric ->
    value) over the steps whose metrics hold `eval/`, `eval_untrained/` or `eval_shuffled/` keys."""
    table: EvalTable = {}
    for step in steps:
        for mode, metrics in split_modes(step.get("metrics", {})).items():
            found: dict[str, dict[str, float]] = {}
            for key, value in metrics.items():
                prefix, _, metric = key.partition("/")
                if metric and prefix in dict(EVAL_VARIANTS):
                    found.setdefault(prefix, {})[metric] = float(value)
            if found:
                table[f"{step['name']} ({mode})" if mode else str(step["name"])] = found
    metrics = sorted({m for variants in table.values() for values in variants.values() for m in values})
    ordered = [m for m in metrics if not is_count(m)] + [m for m in metrics if is_count(m)]
    return list(table), ordered, table


def phase_table(metrics: Mapping[str, float]) -> tuple[list[str], list[str], dict[str, dict[str, float]]] | None:
    """A `<phase>_<metric>` step (the ViT retrieval: `siglip_i2t_r1`, ...) as rows x columns: the
    prefixes that share at least two metrics; None when fewer than two such rows."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        phase, sep, metric = key.partition("_")
        if sep and "/" not in key:
            rows.setdefault(phase, {})[metric] = float(value)
    rows = {phase: values for phase, values in rows.items() if len(values) >= 2}
    if len(rows) < 2:
        return None
    columns = sorted({metric for values in rows.values() for metric in values})
    return list(rows), columns, rows


def train_logs(step: Mapping[str, Any]) -> list[Path]:
    """The `train_log.jsonl` files a step's cache entry lists in its manifest (none for untrained steps)."""
    folder = Path(str(step.get("output_dir") or ""))
    if not step.get("output_dir") or not (folder / MANIFEST).is_file():
        return []
    manifest = Manifest.from_file(folder / MANIFEST)
    return [folder / rel for rel in sorted(manifest.files) if Path(rel).name == TRAIN_LOG]


def loss_curves(steps: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[str, list[int], list[float]]]]:
    """Step name -> one (part, global steps, losses) per part of its training log, in log order."""
    from components.training.runtime import read_log

    curves: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for step in steps:
        for path in train_logs(step):
            parts: list[tuple[str, list[int], list[float]]] = []
            for record in read_log(path).steps:
                if "loss" not in record:
                    continue
                if not parts or parts[-1][0] != record["part"]:
                    parts.append((str(record["part"]), [], []))
                parts[-1][1].append(int(record["global_step"]))
                parts[-1][2].append(float(record["loss"]))
            if parts:
                curves[str(step["name"])] = curves.get(str(step["name"]), []) + parts
    return curves


def funnel(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    """Per data step in pipeline order: `kept` and `dropped: <reason>` counts (a step with `rows_in`
    and `rows_kept`), or `<task> written` counts (the shards)."""
    rows = []
    for step in steps:
        metrics = step.get("metrics", {})
        if "rows_in" in metrics and "rows_kept" in metrics:
            parts = {"kept": float(metrics["rows_kept"])} | {
                f"dropped: {key.split('.', 1)[1]}": float(value) for key, value in sorted(metrics.items())
                if key.startswith("dropped.") and value}
            rows.append((str(step["name"]), parts))
        else:
            written = {f"{key.rsplit('.', 1)[0]} written": float(value) for key, value in sorted(metrics.items())
                       if key.endswith(".written") and value}
            if written:
                rows.append((str(step["name"]), written))
    return rows


# --- charts ----------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.png")
    figure.savefig(tmp, dpi=90)
    _pyplot().close(figure)
    os.replace(tmp, path)
    return path


def _empty_chart(path: Path, title: str, message: str) -> Path:
    """The chart of a pipeline run that has nothing of this kind (e.g. `--until write_shards` trains
    nothing): the title and why it is empty, so the report's image never silently goes missing."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 1.6))
    axes.axis("off")
    axes.set_title(title)
    axes.text(0.5, 0.4, message, ha="center", va="center", fontsize=10, color="#555555")
    return _save(figure, path)


def eval_chart(steps: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One small panel per score: a bar per evaluation step (trained), the untrained starting point as
    a grey tick and the shuffled-image control as a red tick when present."""
    names, metrics, table = eval_table(steps)
    scores = [m for m in metrics if not is_count(m)]
    if not scores:
        return _empty_chart(path, "evaluation scores by stage", "no evaluation step ran in this pipeline")
    plt = _pyplot()
    columns = min(4, len(scores))
    rows = math.ceil(len(scores) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    labels = [short_name(n) for n in names]
    for index, metric in enumerate(scores):
        axes = axes_grid[index // columns][index % columns]
        trained = [table[n].get("eval", {}).get(metric, math.nan) for n in names]
        axes.bar(range(len(names)), trained, color="#4c72b0", label="trained")
        for prefix, colour, label in TICKS:
            values = [table[n].get(prefix, {}).get(metric, math.nan) for n in names]
            if any(not math.isnan(v) for v in values):
                axes.scatter(range(len(names)), values, marker="_", s=400, linewidths=2.5, color=colour, label=label,
                             zorder=3)
        axes.set_xticks(range(len(names)), labels, fontsize=7)
        axes.set_title(metric, fontsize=9)
        axes.tick_params(axis="y", labelsize=7)
    for index in range(len(scores), rows * columns):
        axes_grid[index // columns][index % columns].axis("off")
    handles, legend_labels = axes_grid[0][0].get_legend_handles_labels()
    figure.legend(handles, legend_labels, loc="upper right", fontsize=8)
    figure.suptitle("evaluation scores by stage (bars: trained; ticks: untrained, shuffled images)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(figure, path)


def loss_chart(steps: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One panel per trained step: the loss per global step, raw (thin) and smoothed (thick), a colour per part."""
    from components.training.runtime import smoothed

    curves = loss_curves(steps)
    if not curves:
        return _empty_chart(path, "training loss", "no trained step in this pipeline")
    plt = _pyplot()
    figure, axes_list = plt.subplots(len(curves), 1, figsize=(7, 2.3 * len(curves)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, (name, parts) in zip(axes_list[:, 0], curves.items()):
        for index, (part, x, losses) in enumerate(parts):
            colour = colours[index % len(colours)]
            axes.plot(x, losses, color=colour, alpha=0.35, linewidth=1)
            axes.plot(x, smoothed(losses), color=colour, linewidth=2, label=f"{part} (smoothed)")
        axes.set_title(name, fontsize=9)
        axes.set_ylabel("loss", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.legend(fontsize=7)
    axes_list[-1, 0].set_xlabel("global step", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def step_time_chart(steps: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Each step's wall time in this run; a cached step shows (hatched) what it took when it ran."""
    shown = [s for s in steps if s.get("status") in ("ran", "cached")]
    if not shown:
        return _empty_chart(path, "step times", "no step ran or came from the cache")
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 0.32 * len(shown) + 1.2))
    for index, step in enumerate(reversed(shown)):
        if step["status"] == "cached":
            seconds = float(step.get("metrics", {}).get("duration_s", 0.0))
            axes.barh(index, seconds, color="#dddddd", hatch="//", edgecolor="#999999")
            axes.text(seconds, index, f" cached (took {seconds:.1f}s)", va="center", fontsize=7)
        else:
            seconds = float(step["duration_s"])
            axes.barh(index, seconds, color="#4c72b0")
            axes.text(seconds, index, f" {seconds:.1f}s", va="center", fontsize=7)
    axes.set_yticks(range(len(shown)), [s["name"] for s in reversed(shown)], fontsize=7)
    axes.set_xlabel("seconds", fontsize=8)
    axes.set_title("pipeline step times (blue: ran now; hatched: from the cache)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def funnel_chart(steps: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """A stacked bar per data step: kept, then each drop reason; the shards' bar by task."""
    rows = funnel(steps)
    if not rows:
        return _empty_chart(path, "data funnel", "no data step in this pipeline")
    plt = _pyplot()
    segments = list(dict.fromkeys(label for _, parts in rows for label in parts))
    palette = plt.get_cmap("tab20")
    colours = {label: ("#55a868" if label == "kept" else palette(i % 20)) for i, label in enumerate(segments)}
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(rows) + 2.2))
    for position, (_, parts) in enumerate(rows):
        index, left = len(rows) - 1 - position, 0.0  # the first step at the top
        for label, value in parts.items():
            axes.barh(index, value, left=left, color=colours[label], label=label, edgecolor="white", linewidth=0.5)
            left += value
        axes.text(left, index, f" {left:g}", va="center", fontsize=7)
    axes.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)], fontsize=8)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes.set_xlabel("samples (rows in = kept + dropped)", fontsize=8)
    axes.set_title("data funnel: samples kept and dropped by reason per step", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def short_name(step: str) -> str:
    """`vlm_eval_stage1` -> `stage1`: the part after the last underscore when it names a stage."""
    tail = step.rsplit("_", 1)[-1]
    return tail if tail.startswith("stage") else step


# --- HTML ------------------------------------------------------------------------------------------


def cell(metric: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "<td class=na>-</td>"
    text = str(int(value)) if is_count(metric) and float(value).is_integer() else f"{value:.3f}"
    return f"<td>{text}</td>"


def gap(variants: Mapping[str, Mapping[str, float]], metric: str) -> float | None:
    """Trained minus shuffled: the evaluation's own `eval_gap/` when it logged the metric's, else computed
    from `eval/` and `eval_shuffled/` (None for counts and where either is missing)."""
    if metric in variants.get("eval_gap", {}):
        return float(variants["eval_gap"][metric])
    trained, control = variants.get("eval", {}).get(metric), variants.get("eval_shuffled", {}).get(metric)
    return None if trained is None or control is None or is_count(metric) else trained - control


def eval_html(steps: Sequence[Mapping[str, Any]]) -> str:
    names, metrics, table = eval_table(steps)
    if not names:
        return "<p>No VLM evaluation step ran in this pipeline.</p>"
    variants = {n: [(prefix, label) for prefix, label in EVAL_VARIANTS[:3] if prefix in table[n]] for n in names}
    shuffled = {n: "eval_shuffled" in table[n] and "eval" in table[n] for n in names}
    head = "".join(f"<th colspan={len(variants[n]) + shuffled[n]}>{html.escape(n)}</th>" for n in names)
    sub = "".join("".join(f"<th>{label}</th>" for _, label in variants[n])
                  + ("<th>gap vs shuffled</th>" if shuffled[n] else "") for n in names)
    body = []
    for metric in metrics:
        cells = []
        for name in names:
            for prefix, _ in variants[name]:
                cells.append(cell(metric, table[name].get(prefix, {}).get(metric)))
            if shuffled[name]:
                cells.append(cell(metric, gap(table[name], metric)))
        style = " class=count" if is_count(metric) else ""
        body.append(f"<tr{style}><th>{html.escape(metric)}</th>{''.join(cells)}</tr>")
    return (f"<table><tr><th rowspan=2>metric</th>{head}</tr><tr>{sub}</tr>{''.join(body)}</table>"
            "<p class=note>untrained: the stage's starting point (fresh adapter); shuffled images: the same items "
            "asked with another item's images; gap: trained minus shuffled (a model that reads its images "
            "scores above its shuffled control). Counts (grey) are items per task.</p>")


def phase_html(steps: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for step in steps:
        if "eval" not in str(step["name"]) or any("/" in key for key in step.get("metrics", {})):
            continue
        pivot = phase_table({k: v for k, v in step.get("metrics", {}).items() if k != "duration_s"})
        if pivot is None:
            continue
        rows, columns, values = pivot
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(f"<tr><th>{html.escape(r)}</th>{''.join(cell(c, values[r].get(c)) for c in columns)}</tr>"
                       for r in rows)
        parts.append(f"<h3>{html.escape(str(step['name']))}</h3><table><tr><th></th>{head}</tr>{body}</table>")
    return "".join(parts)


def steps_html(steps: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for step in steps:
        status = str(step.get("status", ""))
        produced = str(step.get("produced_by_run_id") or "")
        link = f"cached: produced by run {html.escape(produced)}" if status == "cached" and produced else ""
        seconds = float(step.get("duration_s", 0.0))
        key, run_id = html.escape(str(step.get("cache_key", ""))[:12]), html.escape(str(step.get("run_id") or ""))
        rows.append(f"<tr class={html.escape(status)}><td>{html.escape(str(step['name']))}</td><td>{html.escape(status)}"
                    f"</td><td>{seconds:.1f}</td><td><code>{key}</code></td><td>{run_id}</td><td>{link}</td></tr>")
    return ("<table><tr><th>step</th><th>status</th><th>seconds</th><th>cache key</th><th>MLflow run</th><th></th></tr>"
            + "".join(rows) + "</table>")


def funnel_html(steps: Sequence[Mapping[str, Any]]) -> str:
    rows = funnel(steps)
    if not rows:
        return "<p>No data step in this pipeline.</p>"
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{sum(parts.values()):g}</td><td>"
                   + html.escape(", ".join(f"{label} {value:g}" for label, value in parts.items())) + "</td></tr>"
                   for name, parts in rows)
    return f"<table><tr><th>step</th><th>samples</th><th>of which</th></tr>{body}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;font-size:14px}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 7px;text-align:right}
th{background:#f3f3f3}tr.count{color:#888}tr.cached td{color:#777}td.na{color:#bbb}code{font-size:12px}
td:first-child,tr>th:first-child{text-align:left}.note{color:#666;font-size:12px;max-width:60em}
img{max-width:100%;display:block;margin:.4em 0 1.2em}"""


def render_html(header: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], charts: Mapping[str, Path]) -> str:
    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header.items())

    def image(name: str) -> str:
        data = base64.b64encode(charts[name].read_bytes()).decode("ascii")
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    title = html.escape(str(header.get("run", "")))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>Run report {title}</title><style>{STYLE}</style>"
            f"</head><body><h1>Pipeline run report</h1><table>{facts}</table>"
            f"<h2>What each stage bought: evaluation</h2>{eval_html(steps)}{phase_html(steps)}"
            f"{image('eval_scores.png')}"
            f"<h2>Training loss per stage</h2>{image('training_loss.png')}"
            f"<h2>Data funnel</h2>{funnel_html(steps)}{image('data_funnel.png')}"
            f"<h2>Steps</h2>{steps_html(steps)}{image('step_times.png')}</body></html>")


def write_report(header: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
    """The four charts and `report.html` (charts embedded) in `out_dir`; returns the HTML's path.
    `steps` are the pipeline summary's step records (name, status, duration_s, metrics, output_dir, ...)."""
    for step in steps:
        if "name" not in step or not isinstance(step.get("metrics", {}), Mapping):
            raise ValueError(f"a step record needs a name and a metrics mapping, got {dict(step)!r:.200}")
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = {"eval_scores.png": eval_chart(steps, out_dir / "eval_scores.png"),
              "training_loss.png": loss_chart(steps, out_dir / "training_loss.png"),
              "step_times.png": step_time_chart(steps, out_dir / "step_times.png"),
              "data_funnel.png": funnel_chart(steps, out_dir / "data_funnel.png")}
    page = out_dir / "report.html"
    tmp = page.with_name(f".{page.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(render_html(header, steps, charts))
    os.replace(tmp, page)
    return page


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: python -m components.common.report runs/pipeline_runs/<run>/summary.json", file=sys.stderr)
        return 2
    summary_path = Path(argv[0])
    try:
        summary = json.loads(summary_path.read_text())
        steps = summary["steps"]
        if not isinstance(steps, list):
            raise TypeError("'steps' is not a list")
    except (ValueError, KeyError, TypeError) as error:
        print(f"{summary_path}: not a pipeline summary ({error})", file=sys.stderr)
        return 2
    header = {"run": summary_path.parent.name, "MLflow run": summary.get("mlflow_run_id", ""),
              "status": summary.get("status", "")}
    print(write_report(header, steps, summary_path.parent / "report"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
