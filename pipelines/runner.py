"""The pipeline runner: walks the steps in order, serves each from the cache or runs it, and records
one MLflow parent run with a child run per step.

Selection: `only` runs just the named steps (everything upstream must already be cached); `from_step`
forces that step and every later one; `force` forces the named steps; `until` stops after that step.
Ray is started only when a step actually runs, so a fully cached rerun costs seconds, except for steps
declared `cached=False` (deploying the endpoint), which run every time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.common.cache import ArtifactCache, Manifest, publish_folder, write_json_atomic
from components.common.config import LayeredDict, dump_yaml, flatten, to_dict
from components.common.contract import Component
from components.common.executor import manifest_for, run_into
from components.common.ray_env import ensure_ray
from components.common.report import EVAL_VARIANTS, train_logs, write_report
from components.common.tracking import MlflowTracker, NullTracker, Tracker, git_commit, relocate_moved_artifacts
from components.schema import REPO_ROOT, PipelineConfig
from components.training.runtime import read_log, step_metric_series

log = logging.getLogger("pipeline")
EVAL_PREFIXES = {prefix for prefix, _ in EVAL_VARIANTS}  # scores the parent run carries as `<step>.<prefix>/<metric>`


@dataclasses.dataclass(frozen=True)
class Step:
    """A component in the pipeline with its inputs wired to upstream outputs: name -> (step, output),
    or a list of such pairs, of which the first whose step is enabled is used (e.g. shards come from
    the CLIP filter, or from the basic filters when the CLIP filter is switched off)."""

    component: Component[Any]
    inputs: dict[str, tuple[str, str] | list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    enabled: Callable[[PipelineConfig], bool] = lambda config: True
    cached: bool = True  # False: runs every time (a step whose point is a side effect, such as deploying)

    @property
    def name(self) -> str:
        return self.component.name


@dataclasses.dataclass(frozen=True)
class Selection:
    only: tuple[str, ...] = ()
    from_step: str | None = None
    force: tuple[str, ...] = ()
    until: str | None = None  # stop after this step

    def check(self, names: list[str]) -> None:
        for name in (*self.only, *self.force, *([self.from_step] if self.from_step else []),
                     *([self.until] if self.until else [])):
            if name not in names:
                raise ValueError(f"unknown step {name!r}; the steps are: {', '.join(names)}")


@dataclasses.dataclass
class StepOutcome:
    name: str
    cache_key: str
    status: str  # ran | cached | skipped (disabled)
    duration_s: float
    output_dir: str
    metrics: dict[str, float]
    run_id: str = ""  # this step's MLflow run in this pipeline run
    produced_by_run_id: str = ""  # the MLflow run that produced its cache entry (itself when it ran)


class PipelineError(RuntimeError):
    """A step could not run for a reason the user can fix (named in the message)."""


class PipelineConfigError(PipelineError):
    """The config names something this machine lacks (found before any step runs)."""


class PipelineRunner:
    def __init__(self, steps: list[Step], config: PipelineConfig, layered: LayeredDict, selection: Selection,
                 tracker: Tracker | None = None) -> None:
        self.steps, self.config, self.layered, self.selection = steps, config, layered, selection
        selection.check([s.name for s in steps])
        self.root = config.root
        self.cache = ArtifactCache(self.root / "cache")
        self.tracker = tracker or make_tracker(config)
        self.commit = git_commit(REPO_ROOT)
        self.record_dir: Path | None = None  # runs/pipeline_runs/<run>/ once `run` started
        self.report_path: Path | None = None  # its report.html once written

    def preflight(self) -> list[str]:
        """What the enabled steps this selection may run find wrong with their config on this machine
        (a missing weights file, an unset key variable), before anything runs."""
        names = [step.name for step in self.steps]
        wanted = names[:names.index(self.selection.until) + 1] if self.selection.until else names
        if self.selection.only:
            wanted = list(self.selection.only)
        problems = []
        for step in self.steps:
            if step.name in wanted and step.component.preflight is not None and step.enabled(self.config):
                problem = step.component.preflight(step.component.config_of(self.config))
                if problem:
                    problems.append(problem)
        return problems

    def run(self, argv: list[str] | None = None) -> list[StepOutcome]:
        problems = self.preflight()
        if problems:
            raise PipelineConfigError("; ".join(problems))
        self.root.mkdir(parents=True, exist_ok=True)
        closed = self.tracker.close_abandoned()
        if closed:
            log.info("marked %d MLflow run(s) of killed pipelines as KILLED", closed)
        started = time.strftime("%Y%m%d-%H%M%S")
        name = self.config.run.name or f"{self.config.profile}-{started}"
        parent = self.tracker.start(name, {
            "profile": self.config.profile, "git_commit": self.commit, "kind": "pipeline",
            "command": " ".join(argv or sys.argv), "selection": json.dumps(dataclasses.asdict(self.selection)),
        })
        record_dir = self.root / "pipeline_runs" / f"{started}-{parent[-8:]}"
        record_dir.mkdir(parents=True, exist_ok=True)
        (record_dir / "resolved_config.yaml").write_text(dump_yaml(self.config))
        (record_dir / "config_sources.json").write_text(json.dumps(self.layered.sources, indent=1, sort_keys=True))
        self.tracker.log_params(parent, flatten(to_dict(self.config)))
        self.tracker.log_artifact(parent, record_dir / "resolved_config.yaml")
        self.tracker.log_artifact(parent, record_dir / "config_sources.json")
        self.record_dir = record_dir
        outcomes: list[StepOutcome] = []
        status = "FAILED"
        try:
            outcomes = self._run_steps(parent)
            status = "FINISHED"
        finally:
            steps = [dataclasses.asdict(o) for o in outcomes]
            write_json_atomic(record_dir / "summary.json", {"mlflow_run_id": parent, "status": status, "steps": steps})
            self.tracker.log_artifact(parent, record_dir / "summary.json")
            self.tracker.log_metrics(parent, {f"{o.name}.duration_s": o.duration_s for o in outcomes} | {
                f"{o.name}.{key}": value for o in outcomes for key, value in o.metrics.items()
                if key.split("/", 1)[0] in EVAL_PREFIXES})  # the runs table compares pipelines' scores
            self._report(parent, name, status, steps, record_dir)
            self.tracker.end(parent, status)
        return outcomes

    def _report(self, parent: str, name: str, status: str, steps: list[dict[str, Any]], record_dir: Path) -> None:
        """The run report (components/common/report.py) beside the run record and on the parent run. A
        report that cannot be drawn is a warning: the steps' results stand without it."""
        header = {"run": name, "MLflow run": parent, "status": status, "profile": self.config.profile,
                  "git commit": self.commit, "run root": str(self.root),
                  "steps": ", ".join(f"{sum(s['status'] == v for s in steps)} {v}" for v in ("ran", "cached", "skipped"))}
        try:
            page = write_report(header, steps, record_dir / "report")
        except Exception:  # noqa: BLE001 - reporting must not turn a finished pipeline into a failed one
            log.exception("the run report could not be written")
            return
        self.report_path = page
        for file in sorted(page.parent.iterdir()):
            self.tracker.log_artifact(parent, file, "report")

    def _run_steps(self, parent: str) -> list[StepOutcome]:
        keys: dict[str, str] = {}
        entries: dict[str, Path] = {}
        outcomes: list[StepOutcome] = []
        forced_from = False
        total = self._steps_to_walk()
        for step in self.steps:
            forced_from = forced_from or step.name == self.selection.from_step
            if not step.enabled(self.config):
                outcomes.append(StepOutcome(step.name, "", "skipped", 0.0, "", {}))
                if step.name == self.selection.until:
                    break
                continue
            inputs, input_keys = self._resolve_inputs(step, keys, entries)
            config = step.component.config_of(self.config)
            material = step.component.key_material(config, input_keys, self.config.run.seed)
            key = step.component.cache_key(config, input_keys, self.config.run.seed)
            must_run = forced_from or step.name in self.selection.force or not step.cached
            manifest = None if must_run else self.cache.lookup(step.name, key)
            if manifest is None and self.selection.only and step.name not in self.selection.only:
                raise PipelineError(
                    f"--only {','.join(self.selection.only)}: upstream step {step.name!r} is not cached for this "
                    f"config; run the pipeline once without --only (or use --from {step.name})")
            counter = f"[{len([o for o in outcomes if o.status != 'skipped']) + 1}/{total}] {step.name}"
            log.info("%s: %s", counter, self._verdict(step, key, manifest, forced_from))
            outcome = self._track_step(parent, step, key, config, inputs, material, manifest)
            keys[step.name], entries[step.name] = key, self.cache.entry(step.name, key)
            outcomes.append(outcome)
            log.info("%s: %s in %.1fs -> %s", counter, outcome.status, outcome.duration_s, outcome.output_dir)
            if self.selection.only and set(self.selection.only) <= {o.name for o in outcomes}:
                break
            if step.name == self.selection.until:
                break
        return outcomes

    def _steps_to_walk(self) -> int:
        """How many enabled steps this selection walks (the N of `[i/N]`): up to --until, or up to the
        last --only step."""
        names = [step.name for step in self.steps]
        last = len(names) - 1
        if self.selection.until:
            last = names.index(self.selection.until)
        if self.selection.only:
            last = min(last, max(names.index(name) for name in self.selection.only))
        return sum(step.enabled(self.config) for step in self.steps[:last + 1])

    def _verdict(self, step: Step, key: str, manifest: Manifest | None, forced_from: bool) -> str:
        """Why a step runs or not, as the terminal says it before the step starts."""
        if manifest is not None:
            produced = f", produced by MLflow run {manifest.run_id}" if manifest.run_id else ""
            return f"cached (key {key[:12]}{produced})"
        if not step.cached:
            return "running (runs every time)"
        if forced_from:
            return f"running (forced: --from {self.selection.from_step})"
        if step.name in self.selection.force:
            return "running (forced: --force)"
        return f"running (not cached: key {key[:12]})"

    def _resolve_inputs(self, step: Step, keys: dict[str, str], entries: dict[str, Path]
                        ) -> tuple[dict[str, Path], dict[str, str]]:
        inputs: dict[str, Path] = {}
        input_keys: dict[str, str] = {}
        for input_name, wiring in step.inputs.items():
            candidates = wiring if isinstance(wiring, list) else [wiring]
            upstream, output_name = next(((s, o) for s, o in candidates if s in keys), candidates[-1])
            if upstream not in keys:
                if input_name in step.component.optional_inputs:
                    continue
                raise PipelineError(f"step {step.name!r} needs {upstream!r}, which is disabled or not wired before it")
            inputs[input_name] = entries[upstream] / output_name
            input_keys[input_name] = keys[upstream]
        return inputs, input_keys

    def _track_step(self, parent: str, step: Step, key: str, config: Any, inputs: dict[str, Path],
                    material: dict[str, Any], manifest: Manifest | None) -> StepOutcome:
        comp = step.component
        cached = manifest is not None
        tags = {"step": step.name, "component": comp.name, "component_version": comp.version, "cache_key": key,
                "cache_hit": str(cached).lower(), "git_commit": self.commit,
                "profile": self.config.profile, "code_hash": material["code"],
                "inputs": json.dumps({n: str(p) for n, p in inputs.items()})}
        if manifest is not None and manifest.run_id:
            tags["produced_by_run_id"] = manifest.run_id
        run_id = self.tracker.start(f"{step.name} (cached)" if cached else step.name, tags, parent=parent)
        self.tracker.log_params(run_id, flatten(to_dict(config)))
        try:
            if manifest is None:
                manifest = self._execute(step, key, config, inputs, material, run_id)
                duration, status = manifest.duration_s, "ran"
            else:
                duration, status = 0.0, "cached"
                self._copy_curves(run_id, self.cache.entry(step.name, key))
        except BaseException:
            self.tracker.set_tags(run_id, {"error": traceback.format_exc()[-4000:]})
            self.tracker.end(run_id, "FAILED")
            raise
        entry = self.cache.entry(step.name, key)
        self.tracker.set_tags(run_id, {"output_dir": str(entry)} | {
            f"output.{name}": str(entry / rel) for name, rel in manifest.outputs.items()})
        self.tracker.log_metrics(run_id, manifest.metrics)
        for artifact in manifest.artifacts:  # under outputs/ with their folders (eval/gallery/..., vlm/...)
            if (entry / artifact).is_file():
                self.tracker.log_artifact(run_id, entry / artifact, str(Path("outputs", artifact).parent))
        self.tracker.end(run_id)
        return StepOutcome(step.name, key, status, duration, str(entry), manifest.metrics, run_id, manifest.run_id)

    def _copy_curves(self, run_id: str, entry: Path) -> None:
        """A cached trained step's run gets the per-step `train/*` curves of the run that trained it (read
        back from the entry's training logs), so a cached rerun's runs still overlay."""
        for path in train_logs({"output_dir": str(entry)}):
            self.tracker.log_history(run_id, step_metric_series(read_log(path).steps))

    def _execute(self, step: Step, key: str, config: Any, inputs: dict[str, Path], material: dict[str, Any],
                 run_id: str) -> Manifest:
        ray_cfg = self.config.ray
        tracking_uri = getattr(self.tracker, "tracking_uri", "")
        ensure_ray(ray_cfg.address, ray_cfg.num_cpus, ray_cfg.include_dashboard, REPO_ROOT)
        with self.cache.staging(step.name, key) as staged:
            result, duration = run_into(step.component, config, inputs, staged, self.config.run.seed,
                                        lambda metrics, step_no: self.tracker.log_metrics(run_id, metrics, step_no),
                                        tracking_uri, run_id if tracking_uri else "")
            manifest = manifest_for(step.component, key, material, result, duration, run_id if tracking_uri else "")
            publish_folder(staged, self.cache.entry(step.name, key), manifest)
        return manifest


def make_tracker(config: PipelineConfig) -> Tracker:
    if not config.mlflow.experiment:
        return NullTracker()
    if not config.mlflow.tracking_uri and not config.mlflow.artifact_location:  # the local store in run.root
        for old, rows in relocate_moved_artifacts(config.root).items():
            log.info("the run root moved: %d artifact URIs under %s now point into %s", rows, old, config.root)
    return MlflowTracker(config.tracking_uri, config.mlflow.experiment, config.artifact_location)
