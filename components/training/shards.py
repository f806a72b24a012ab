"""Streaming training samples out of the data stage's WebDataset shards, for every trained stage (the
ViT's pretraining, the VLM's stages): per-worker sharding, a stable train / held-out split, resumable
positions, media decoding, and bad samples dropped and counted by reason.

Each worker reads its own shards (shard i goes to worker i mod world_size; with fewer shards than
workers every worker reads all of them and keeps every world_size-th sample). Caption pairs whose key
hash falls in `holdout_fraction` are held out (for retrieval evaluation); other tasks are not split.
Shard order is reshuffled each epoch from the seed, so a stream is a pure function of (seed, rank,
world size) and resuming means skipping the raw samples already consumed, without decoding them. A truncated shard
ends that shard (counted once as `truncated_shard`); a sample whose image does not decode is dropped as
`corrupt_image`, one without caption text as `caption_missing`, one without media as `missing_image`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from components.common.webdataset_tar import TarCut, iter_samples

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_EMPTY_EPOCHS = 10  # epochs in a row without a raw sample before a stream gives up
MAX_CONSECUTIVE_DROPS = 1000  # samples in a row that fail to decode before a stream gives up


@dataclasses.dataclass
class RawSample:
    """One sample's tar members, undecoded."""

    key: str
    members: dict[str, bytes]  # extension -> bytes ("jpg", "txt", "json", "frame0000.jpg", ...)

    def info(self) -> dict[str, Any]:
        """The `<key>.json` member; ValueError when it is not a JSON object."""
        info = json.loads(self.members["json"]) if "json" in self.members else {}
        if not isinstance(info, dict):
            raise ValueError(f"{self.key}.json is not a JSON object")
        return info

    def base_key(self) -> str:
        """The key of the original sample (rebalancing copies `<key>_r1` share their original's split)."""
        try:
            return self.info().get("repeat_of") or self.key
        except (ValueError, UnicodeDecodeError):
            return self.key


class DropCounter(collections.Counter[str]):
    """Dropped samples by reason; kept samples under `kept`."""

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{reason}": float(count) for reason, count in sorted(self.items())}


def is_held_out(base_key: str, fraction: float) -> bool:
    """A stable split by key hash: the same pairs are held out in every run, phase and worker."""
    digest = int.from_bytes(hashlib.sha1(base_key.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def caption_split_key(raw: RawSample, task: str) -> str | None:
    """The ViT's split: caption pairs by their original's key; other tasks are not split (None)."""
    return raw.base_key() if task == "caption" else None


def picture_split_key(raw: RawSample, task: str) -> str:
    """Every sample split, and one picture never on both sides: caption pairs by their original's key
    (as `caption_split_key`), every other sample by a hash of its first image's bytes, so the grounding
    and counting samples of one rendered picture, and the samples of one video clip, fall together.
    Thresholds on the same hashes nest: what a smaller fraction holds out, a larger one does too."""
    if task == "caption":
        return raw.base_key()
    media = media_names(raw)
    if not media:
        return raw.key
    return "media:" + hashlib.sha1(raw.members[media[0]]).hexdigest()


def read_shard(path: Path, counter: DropCounter) -> Iterator[RawSample]:
    """The shard's samples. A shard cut short ends early: the samples before the cut are yielded, the
    one it cut into is counted as `truncated_sample`, and the shard once as `truncated_shard`."""
    try:
        for key, members in iter_samples(path):
            yield RawSample(key=key, members=members)
    except TarCut as cut:
        log.warning("shard %s is unreadable past a point (%s); the rest of it is skipped", path, cut)
        counter["truncated_shard"] += 1
        if cut.partial_key is not None:
            counter["truncated_sample"] += 1


class ShardStream:
    """An endless stream of raw samples for one worker; `position` counts raw samples consumed."""

    def __init__(self, shards: list[Path], rank: int, world_size: int, seed: int, held_out: bool,
                 holdout_fraction: float, counter: DropCounter,
                 split_key: Callable[[RawSample, str], str | None] = caption_split_key) -> None:
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.rank, self.world_size, self.seed = sorted(shards), rank, world_size, seed
        self.held_out, self.holdout_fraction, self.counter = held_out, holdout_fraction, counter
        self.split_key = split_key  # (sample, task folder) -> the key its split hashes, or None: never held out
        self.position = 0

    def epoch(self, epoch: int) -> Iterator[RawSample]:
        """One pass over this worker's part of the data, in this epoch's shard order."""
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        by_shard = len(order) >= self.world_size
        mine = order[self.rank::self.world_size] if by_shard else order
        index = 0
        for shard in mine:
            task = shard.parent.name
            for raw in read_shard(shard, self.counter):
                if not by_shard:
                    index += 1
                    if (index - 1) % self.world_size != self.rank:
                        continue
                split_on = self.split_key(raw, task)
                held = split_on is not None and is_held_out(split_on, self.holdout_fraction)
                if held == self.held_out:
                    yield raw

    def __iter__(self) -> Iterator[RawSample]:
        """Epoch after epoch; fails after MAX_EMPTY_EPOCHS epochs in a row without a sample (unreadable
        or held-out data), since one unlucky deal of bad shards must not stop a worker."""
        epoch, empty_epochs = 0, 0
        while True:
            produced = False
            for raw in self.epoch(epoch):
                produced = True
                self.position += 1
                yield raw
            epoch += 1
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(f"worker {self.rank} has no readable samples in {len(self.shards)} shard(s)")

    def skip(self, count: int) -> Iterator[RawSample]:
        """The stream after `count` raw samples (resuming); skipped samples are not decoded or counted."""
        stream, muted = iter(self), self.counter.copy()
        for _ in range(count):
            next(stream)
        self.counter.clear()
        self.counter.update(muted)
        return stream


def media_names(raw: RawSample) -> list[str]:
    """The sample's media members in order: a clip's frames, else its one image."""
    frames = sorted(ext for ext in raw.members if ext.startswith("frame"))
    return frames or [ext for ext in IMAGE_EXTS if ext in raw.members][:1]


def decode_media(raw: RawSample, counter: DropCounter) -> list[Image.Image] | None:
    """The sample's image or frames as RGB, or None with `missing_image` / `corrupt_image` counted."""
    names = media_names(raw)
    if not names:
        counter["missing_image"] += 1
        return None
    images = []
    for name in names:
        try:
            with Image.open(io.BytesIO(raw.members[name])) as image:
                image.load()
                images.append(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            counter["corrupt_image"] += 1
            return None
    return images


def task_shards(shards_dir: Path, tasks: tuple[str, ...]) -> list[Path]:
    """The shard files of `tasks` in a write_shards output folder."""
    return sorted(p for task in tasks for p in (Path(shards_dir) / task).glob("*.tar"))
