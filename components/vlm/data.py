"""VLM training and evaluation samples out of the data stage's shards: the held-out split, decoding with
drops counted by reason, the task mix of a stage, and a sample's images as ViT input.

The split never lets one picture be on both sides: caption pairs split by their original's key (the ViT
pretraining's rule, so with a fraction no larger than the ViT's the VLM's held-out captions were never
seen by the ViT either), every other sample by a hash of its first image's bytes (the grounding and
counting samples of one rendered image, and the three samples of one video clip, fall together).
The mix draws each sample's task from the stage's weights with a generator seeded by (seed, rank), so
it is a pure function of those and of how many samples were drawn: a resumed worker replays it.
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from components.vit.config import SeedViTConfig
from components.vit.preprocess import PackedImages, image_to_patches, native_size, pack
from components.training.shards import DropCounter, RawSample, ShardStream, decode_media, picture_split_key, task_shards


vlm_split_key = picture_split_key  # the VLM's split: one picture never on both sides


@dataclasses.dataclass
class VlmSample:
    """A decoded sample: its json (task, caption, conversations, annotations) and its images or frames."""

    key: str
    task: str
    info: dict[str, Any]
    images: list[Image.Image]

    def frame_timestamps(self) -> list[float] | None:
        stamps = self.info.get("annotations", {}).get("timestamps") if isinstance(self.info.get("annotations"), dict) else None
        if self.task != "video":
            return None
        if isinstance(stamps, list) and len(stamps) == len(self.images):
            return [float(t) for t in stamps]
        return [float(i) for i in range(len(self.images))]  # no timestamps: one per second


def decode_sample(raw: RawSample, task: str, counter: DropCounter) -> VlmSample | None:
    """Decode one raw sample, or count why it is dropped and return None."""
    try:
        info = raw.info()
    except (ValueError, UnicodeDecodeError):
        counter["bad_json"] += 1
        return None
    if not info.get("caption") and not info.get("conversations"):
        counter["no_text"] += 1
        return None
    images = decode_media(raw, counter)
    if images is None:
        return None
    return VlmSample(key=raw.key, task=str(info.get("task") or task), info=info, images=images)


def evenly_spaced_indices(total: int, count: int) -> list[int]:
    if total <= count:
        return list(range(total))
    return [round(i * (total - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def select_frames(sample: VlmSample, frames_per_clip: int) -> tuple[list[Image.Image], list[float] | None]:
    """A video's frames drawn evenly (with their timestamps); an image sample's images unchanged."""
    stamps = sample.frame_timestamps()
    if stamps is None:
        return sample.images, None
    chosen = evenly_spaced_indices(len(sample.images), frames_per_clip)
    return [sample.images[i] for i in chosen], [stamps[i] for i in chosen]


def image_token_count(image: Image.Image, vit: SeedViTConfig) -> int:
    """The LLM tokens an image becomes: one per 28x28 pixels of its native-resolution size."""
    factor = vit.patch_size * vit.merge_size
    height, width = native_size(image.height, image.width, factor, vit.min_pixels, vit.max_pixels)
    return (height // factor) * (width // factor)


def images_to_vit_input(images: list[Image.Image], vit: SeedViTConfig) -> PackedImages | None:
    return pack([image_to_patches(image, vit) for image in images]) if images else None


class MixedStream:
    """Samples of several tasks for one worker, each draw's task picked by the mix weights."""

    def __init__(self, shards_dir: Path, mix: dict[str, float], rank: int, world_size: int, seed: int,
                 holdout_fraction: float, counter: DropCounter, positions: dict[str, int] | None = None,
                 draws: int = 0) -> None:
        available = {task: weight for task, weight in sorted(mix.items())
                     if weight > 0 and task_shards(shards_dir, (task,))}
        if not available:
            raise ValueError(f"none of the mix's tasks {sorted(mix)} has shards in {shards_dir}")
        self.counter = counter
        self.tasks, self.weights = list(available), [available[t] for t in available]
        self.streams = {task: ShardStream(task_shards(shards_dir, (task,)), rank, world_size, seed, held_out=False,
                                          holdout_fraction=holdout_fraction, counter=counter, split_key=vlm_split_key)
                        for task in self.tasks}
        self.iterators = {task: self.streams[task].skip((positions or {}).get(task, 0)) for task in self.tasks}
        self.rng = random.Random(seed * 1_000_033 + rank)
        for _ in range(draws):  # replay the task choices already made
            self.rng.random()
        self.draws = draws

    @property
    def positions(self) -> dict[str, int]:
        return {task: stream.position for task, stream in self.streams.items()}

    def __iter__(self) -> Iterator[VlmSample]:
        failures = 0
        while True:
            self.draws += 1
            task = self.rng.choices(self.tasks, self.weights)[0]
            sample = decode_sample(next(self.iterators[task]), task, self.counter)
            if sample is None:
                failures += 1
                if failures >= 1000:
                    raise RuntimeError(f"1000 samples in a row could not be used: {dict(self.counter)}")
                continue
            failures = 0
            yield sample


def held_out_samples(shards_dir: Path, tasks: tuple[str, ...], holdout_fraction: float,
                     counter: DropCounter) -> Iterator[VlmSample]:
    """Every decodable held-out sample of `tasks` (rebalancing copies skipped), in shard and key order."""
    for task in tasks:
        shards = task_shards(shards_dir, (task,))
        if not shards:
            continue
        stream = ShardStream(shards, 0, 1, 0, held_out=True, holdout_fraction=holdout_fraction,
                             counter=counter, split_key=vlm_split_key)
        for raw in stream.epoch(0):
            if raw.base_key() != raw.key:
                continue
            sample = decode_sample(raw, task, counter)
            if sample is not None:
                yield sample


def encode_png(image: Image.Image) -> bytes:
    """An image as PNG bytes: how evaluation rows and prompts carry their pictures through Ray."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def corpus_texts(sample: VlmSample) -> list[str]:
    """The plain text of a sample for text-only LLM pretraining: caption, questions and answers."""
    texts = []
    caption = sample.info.get("caption")
    if isinstance(caption, str) and caption.strip():
        texts.append(caption.strip())
    conversations = sample.info.get("conversations")
    if isinstance(conversations, list):
        for turn in conversations:
            if isinstance(turn, dict):
                value = turn.get("value", turn.get("content"))
                if isinstance(value, str):
                    text = value.replace("<image>", "").replace("<video>", "").strip()
                    if text:
                        texts.append(text)
    return texts


def to_device(packed: PackedImages | None, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if packed is None:
        return None, None
    return packed.pixel_values.to(device), packed.grid_hw.to(device)
