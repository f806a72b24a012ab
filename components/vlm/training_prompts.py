"""The training split's samples as prompts, for the steps that ask the model about them and judge its answers
(rejection sampling, RL). A module apart from `data.py` because it reads the evaluation's item rules
(`eval_tasks`), which the training stages must not depend on: an edit to the scoring would change every
training step's cache key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.training.shards import DropCounter, RawSample, ShardStream, task_shards
from components.vlm.data import decode_sample, encode_png, select_frames, vlm_split_key


def training_turns(shards_dir: Path, task: str, holdout_fraction: float, frames_per_clip: int, kinds: Any,
                   counter: DropCounter) -> Iterator[tuple[RawSample, list[Any], list[bytes], list[float]]]:
    """The training split's samples of `task` as prompts, for the steps that ask the model about them
    (rejection sampling, RL): each decodable sample (rebalancing copies skipped: their original is asked)
    with its single-turn evaluation items whose kind is in `kinds` (the evaluation's item rules: one question
    asked alone with its media), its images or frames as PNG bytes and the frames' times. A sample with no
    such turn is counted as `no_wanted_turn`; the caller stops reading when it has enough."""
    from components.vlm.eval_tasks import items_from_sample

    shards = task_shards(shards_dir, (task,))
    if not shards:
        return
    stream = ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=holdout_fraction, counter=counter,
                         split_key=vlm_split_key)
    for raw in stream.epoch(0):
        if raw.base_key() != raw.key:
            continue
        sample = decode_sample(raw, task, counter)
        if sample is None:
            continue
        items = [i for i in items_from_sample({**sample.info, "task": task, "key": sample.key}) if i.kind in kinds]
        if not items:
            counter["no_wanted_turn"] += 1
            continue
        images, stamps = select_frames(sample, frames_per_clip)
        yield raw, items, [encode_png(image) for image in images], list(stamps or [])
