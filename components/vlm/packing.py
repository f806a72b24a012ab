"""Sequence packing for the LLM: several encoded samples share one fixed-length sequence, each with
position ids that restart at 0, so attention stays inside each sample.

Hugging Face models given `position_ids` and no `attention_mask` treat every restart of the position
ids as the start of a new sequence and build a block-diagonal causal mask (InternVL's packed dataset
relies on the same idea with flash-attention's cumulative lengths). Every pack is padded to exactly
`max_tokens`; the padding is its own position run 0, 1, 2, ... with labels -100, so it is a separate
segment that no sample attends into.

Packs are built best-fit from a small buffer: when the buffer is full, a pack starts with the oldest
buffered sample and repeatedly takes the largest buffered sample that still fits both the token cap
and the image cap. The same input order always gives the same packs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from components.vlm.conversation import IGNORE_INDEX, EncodedSample


@dataclass
class Pack:
    """One packed sequence of exactly max_tokens tokens: its samples in order, then padding."""

    input_ids: torch.Tensor  # LongTensor [T]
    labels: torch.Tensor  # LongTensor [T], -100 where no loss (and on all padding)
    position_ids: torch.Tensor  # LongTensor [T], restarting at 0 for every sample and for the padding
    samples: list[EncodedSample]
    num_padding: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return sum(sample.num_images for sample in self.samples)

    @property
    def image_token_counts(self) -> list[int]:
        return [count for sample in self.samples for count in sample.image_token_counts]

    @property
    def media(self) -> list[Any]:
        return [item for sample in self.samples for item in sample.media]


def _position_runs(lengths: Sequence[int]) -> torch.Tensor:
    """0..n-1 for every length n, concatenated."""
    runs = [torch.arange(length, dtype=torch.long) for length in lengths if length > 0]
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.long)


def build_pack(samples: Sequence[EncodedSample], max_tokens: int, pad_id: int) -> Pack:
    """The samples laid end to end and padded to max_tokens (pad_id, label -100, own position run)."""
    used = sum(sample.length for sample in samples)
    if used > max_tokens:
        raise ValueError(f"samples hold {used} tokens, more than max_tokens={max_tokens}")
    num_padding = max_tokens - used
    input_ids = [token for sample in samples for token in sample.input_ids] + [pad_id] * num_padding
    labels = [label for sample in samples for label in sample.labels] + [IGNORE_INDEX] * num_padding
    return Pack(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        position_ids=_position_runs([sample.length for sample in samples] + [num_padding]),
        samples=list(samples),
        num_padding=num_padding,
    )


class Packer:
    """Best-fit packing over a buffer of up to `buffer_size` samples; `add` returns the packs that
    became ready (zero or one), `flush` packs whatever is left at the end of the stream."""

    def __init__(self, max_tokens: int, max_images: int, pad_id: int, buffer_size: int = 16) -> None:
        if max_tokens < 1 or max_images < 0 or buffer_size < 1:
            raise ValueError(f"need max_tokens >= 1, max_images >= 0, buffer_size >= 1; got "
                             f"{max_tokens}, {max_images}, {buffer_size}")
        self.max_tokens = max_tokens
        self.max_images = max_images
        self.pad_id = pad_id
        self.buffer_size = buffer_size
        self._buffer: list[EncodedSample] = []

    def _check_fits_alone(self, sample: EncodedSample) -> None:
        if sample.length < 1:
            raise ValueError(f"sample {sample.key!r} has no tokens")
        if sample.length > self.max_tokens:
            raise ValueError(f"sample {sample.key!r} has {sample.length} tokens, max_tokens is {self.max_tokens}")
        if sample.num_images > self.max_images:
            raise ValueError(f"sample {sample.key!r} has {sample.num_images} images, "
                             f"max_images is {self.max_images}")

    def _largest_fitting(self, tokens_left: int, images_left: int) -> int | None:
        """Buffer index of the longest sample within both budgets (the oldest among equals)."""
        best: int | None = None
        for index, sample in enumerate(self._buffer):
            if sample.length > tokens_left or sample.num_images > images_left:
                continue
            if best is None or sample.length > self._buffer[best].length:
                best = index
        return best

    def _next_pack(self) -> Pack:
        """Take the oldest sample, then best-fit samples, out of the buffer into one pack."""
        chosen = [self._buffer.pop(0)]
        tokens_left = self.max_tokens - chosen[0].length
        images_left = self.max_images - chosen[0].num_images
        while (index := self._largest_fitting(tokens_left, images_left)) is not None:
            sample = self._buffer.pop(index)
            chosen.append(sample)
            tokens_left -= sample.length
            images_left -= sample.num_images
        return build_pack(chosen, self.max_tokens, self.pad_id)

    def add(self, sample: EncodedSample) -> list[Pack]:
        """Buffer the sample; when the buffer is full, build and return one pack."""
        self._check_fits_alone(sample)
        self._buffer.append(sample)
        return [self._next_pack()] if len(self._buffer) >= self.buffer_size else []

    def flush(self) -> list[Pack]:
        """Pack every buffered sample (end of stream)."""
        packs = []
        while self._buffer:
            packs.append(self._next_pack())
        return packs


def pack_stream(samples: Iterable[EncodedSample], *, max_tokens: int, max_images: int, pad_id: int,
                buffer_size: int = 16) -> Iterator[Pack]:
    """The packs of a stream of samples (see `Packer`)."""
    packer = Packer(max_tokens, max_images, pad_id, buffer_size)
    for sample in samples:
        yield from packer.add(sample)
    yield from packer.flush()


def padding_fraction(packs: Sequence[Pack]) -> float:
    """Padding tokens over all tokens of the packs (0.0 for no packs)."""
    total = sum(pack.num_tokens for pack in packs)
    return sum(pack.num_padding for pack in packs) / total if total else 0.0


def collate(packs: Sequence[Pack]) -> dict[str, torch.Tensor]:
    """input_ids, labels and position_ids of equal-length packs stacked into [B, max_tokens]."""
    if not packs:
        raise ValueError("collate needs at least one pack")
    lengths = {pack.num_tokens for pack in packs}
    if len(lengths) != 1:
        raise ValueError(f"packs differ in length: {sorted(lengths)}")
    return {
        "input_ids": torch.stack([pack.input_ids for pack in packs]),
        "labels": torch.stack([pack.labels for pack in packs]),
        "position_ids": torch.stack([pack.position_ids for pack in packs]),
    }
