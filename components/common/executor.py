"""Running one component into a staging folder and describing the result in a manifest; shared by
the pipeline runner and each component's own command."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.common.cache import Manifest
from components.common.contract import Component, StageContext, StageResult


def run_into(
    comp: Component[Any],
    config: Any,
    inputs: dict[str, Path],
    staged: Path,
    seed: int,
    log_metrics: Callable[[dict[str, float], int | None], None] = lambda metrics, step: None,
    tracking_uri: str = "",
    run_id: str = "",
) -> tuple[StageResult, float]:
    """Run `comp` with its outputs under `staged`; returns its result and wall time."""
    missing = [name for name in comp.inputs if name not in inputs and name not in comp.optional_inputs]
    if missing:
        raise ValueError(f"component {comp.name!r} needs inputs {missing}; got {sorted(inputs)}")
    outputs = {name: staged / name for name in comp.outputs}
    context = StageContext(config=config, inputs=inputs, outputs=outputs, workdir=staged, seed=seed,
                           log_metrics=log_metrics, tracking_uri=tracking_uri, run_id=run_id)
    started = time.perf_counter()
    result = comp.run(context)
    duration = time.perf_counter() - started
    absent = [name for name, path in outputs.items() if not path.exists()]
    if absent:
        raise RuntimeError(f"component {comp.name!r} finished without writing its outputs {absent}")
    return result, duration


def manifest_for(
    comp: Component[Any], key: str, material: dict[str, Any], result: StageResult, duration: float, run_id: str = ""
) -> Manifest:
    return Manifest(
        component=comp.name, version=comp.version, cache_key=key, key_material=material,
        outputs={name: name for name in comp.outputs}, files={},
        metrics={k: float(v) for k, v in result.metrics.items()} | {"duration_s": duration},
        created_at=time.time(), duration_s=duration, artifacts=list(result.artifacts), run_id=run_id,
    )
