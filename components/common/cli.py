"""Each component's own command: run one stage on explicit input folders into an output folder.

    python -m components.data.basic_filters --input samples=runs/cache/ingest/<key>/samples \\
        --output /tmp/filtered --set data.basic_filters.min_short_side=128

The output folder is published atomically (staged beside it, manifest last, then renamed), and
the run is tracked in MLflow as a stand-alone run unless `--no-track`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from components.common.cache import MANIFEST, STAGING_PREFIX, Manifest, publish_folder, remove_abandoned_staging
from components.common.config import ConfigError, flatten, to_dict
from components.common.contract import Component
from components.common.executor import manifest_for, run_into
from components.common.ray_env import ensure_ray
from components.common.tracking import MlflowTracker, NullTracker, Tracker, git_commit
from components.schema import REPO_ROOT, load_config


def component_main(comp: Component[Any], argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog=f"python -m {comp.module}", description=f"Run the {comp.name!r} stage.")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                        help=f"named inputs: {', '.join(comp.inputs) or 'none'}")
    parser.add_argument("--output", required=True, help="folder to publish the outputs into")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--experiment", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE")
    parser.add_argument("--no-track", action="store_true", help="do not log an MLflow run")
    args = parser.parse_args(argv)
    try:
        config, _ = load_config(args.profile, args.experiment, args.overrides)
        inputs = parse_inputs(comp, args.input)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stage_config = comp.config_of(config)
    problem = comp.preflight(stage_config) if comp.preflight is not None else ""
    if problem:
        print(f"config error: {problem}", file=sys.stderr)
        return 2
    input_keys = {name: upstream_key(path) for name, path in inputs.items()}
    material = comp.key_material(stage_config, input_keys, config.run.seed)
    key = comp.cache_key(stage_config, input_keys, config.run.seed)
    tracker: Tracker = NullTracker() if args.no_track else MlflowTracker(
        config.tracking_uri, config.mlflow.experiment, config.artifact_location)
    run_id = tracker.start(f"{comp.name}-standalone", {"component": comp.name, "cache_key": key, "kind": "component",
                                                       "git_commit": git_commit(REPO_ROOT), "profile": config.profile})
    tracker.log_params(run_id, flatten(to_dict(stage_config)))
    output = Path(args.output).expanduser().resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(output.parent)
    staged = output.parent / f"{STAGING_PREFIX}{output.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged.mkdir()
    status = "FAILED"
    try:
        ensure_ray(config.ray.address, config.ray.num_cpus, config.ray.include_dashboard, REPO_ROOT)
        result, duration = run_into(comp, stage_config, inputs, staged, config.run.seed,
                                    lambda metrics, step: tracker.log_metrics(run_id, metrics, step))
        manifest = manifest_for(comp, key, material, result, duration, run_id if tracker.tracking_uri else "")
        publish_folder(staged, output, manifest)
        tracker.log_metrics(run_id, manifest.metrics)
        status = "FINISHED"
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
        tracker.end(run_id, status)
    print(json.dumps({"component": comp.name, "output": str(output), "metrics": manifest.metrics}, indent=1))
    return 0


def named_component_main(components: dict[str, Component[Any]], module: str, usage: str) -> int:
    """`python -m <module> <step> ...` for a module that defines several steps (e.g. the VLM stages)."""
    if len(sys.argv) < 2 or sys.argv[1] not in components:
        print(f"usage: python -m {module} {{{','.join(components)}}} {usage}", file=sys.stderr)
        return 2
    return component_main(components[sys.argv[1]], sys.argv[2:])


def parse_inputs(comp: Component[Any], items: list[str]) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in comp.inputs:
            raise ValueError(f"--input {item!r}: expected NAME=PATH with NAME one of {list(comp.inputs)}")
        if not Path(path).exists():
            raise ValueError(f"--input {name}: {path} does not exist")
        inputs[name] = Path(path).resolve()
    missing = [n for n in comp.inputs if n not in inputs and n not in comp.optional_inputs]
    if missing:
        raise ValueError(f"missing --input for {missing}")
    return inputs


def upstream_key(path: Path) -> str:
    """The cache key of the entry an input folder belongs to, or a stand-in naming the folder."""
    for folder in (path, path.parent):
        if (folder / MANIFEST).is_file():
            return Manifest.from_file(folder / MANIFEST).cache_key
    return f"external:{path}"
