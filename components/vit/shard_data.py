"""The ViT's view of the shards: caption pairs (one image or a clip's frames and its caption), decoded
from the training runtime's raw streams, and the held-out pairs retrieval evaluation scores."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from components.training.shards import (MAX_CONSECUTIVE_DROPS, DropCounter, RawSample, decode_media, is_held_out,
                                        read_shard, task_shards)


@dataclasses.dataclass
class Sample:
    """A decoded sample: one image (or the frames of a clip) and its caption."""

    key: str
    task: str
    images: list[Image.Image]
    caption: str


def decode(raw: RawSample, counter: DropCounter) -> Sample | None:
    """Decode one raw sample, or count why it is dropped and return None."""
    try:
        info = raw.info()
    except (ValueError, UnicodeDecodeError):
        counter["bad_json"] += 1
        return None
    caption = raw.members.get("txt", b"").decode("utf-8", errors="replace").strip() or str(info.get("caption") or "")
    if not caption.strip():
        counter["caption_missing"] += 1
        return None
    images = decode_media(raw, counter)
    if images is None:
        return None
    counter["kept"] += 1
    return Sample(key=raw.key, task=str(info.get("task") or "caption"), images=images, caption=caption)


def decoded(stream: Iterator[RawSample], counter: DropCounter) -> Iterator[Sample]:
    """The decodable samples of a raw stream, in order; fails when MAX_CONSECUTIVE_DROPS in a row do not
    decode (the data is unusable, and an endless stream would otherwise spin forever)."""
    failures = 0
    for raw in stream:
        sample = decode(raw, counter)
        if sample is None:
            failures += 1
            if failures >= MAX_CONSECUTIVE_DROPS:
                raise RuntimeError(f"{failures} samples in a row could not be used: {dict(counter)}")
            continue
        failures = 0
        yield sample


def held_out_pairs(shards_dir: Path, holdout_fraction: float, max_pairs: int) -> list[Sample]:
    """The first `max_pairs` decodable held-out caption pairs by key (originals only, never rebalancing
    copies). Keys are listed first, so only the chosen images are decoded and kept; another pass
    replaces any that fail to decode."""
    shards = task_shards(shards_dir, ("caption",))
    counter = DropCounter()
    keys = sorted(raw.key for shard in shards for raw in read_shard(shard, counter)
                  if raw.base_key() == raw.key and is_held_out(raw.key, holdout_fraction))
    pairs: dict[str, Sample] = {}
    start = 0
    while len(pairs) < max_pairs and start < len(keys):
        chosen = set(keys[start:start + max_pairs - len(pairs)])
        start += len(chosen)
        for shard in shards:
            for raw in read_shard(shard, counter):
                sample = decode(raw, counter) if raw.key in chosen else None
                if sample is not None:
                    pairs[sample.key] = sample
    return [pairs[key] for key in sorted(pairs)]
