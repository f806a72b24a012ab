"""Turning images into Seed-ViT's packed input: native-resolution resize to multiples of 28, CLIP
normalisation, 14x14 patches in 2x2-group order, and packing several images into one batch."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.vit.config import SeedViTConfig

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def native_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, aspect ratio kept as far as rounding allows,
    scaled down or up so the pixel count lies within [min_pixels, max_pixels] (the cap wins when both
    cannot hold). Every side is at least one `factor`, so a 1-pixel-wide strip still gives one 2x2 cell;
    when a side is held at that floor, the other takes what the cap leaves."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
        if h * w > max_pixels:  # one side sits at the one-cell floor: fit the other under the cap
            if h == factor:
                w = max(factor, max_pixels // h // factor * factor)
            else:
                h = max(factor, max_pixels // w // factor * factor)
    return h, w


def image_to_patches(image: Image.Image, config: SeedViTConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """One PIL image -> (num_patches, 3*14*14) normalised patches in 2x2-group order, and its (h, w) grid."""
    factor = config.patch_size * config.merge_size
    height, width = native_size(image.height, image.width, factor, config.min_pixels, config.max_pixels)
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = (np.asarray(resized, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD  # (H, W, 3)
    p, m = config.patch_size, config.merge_size
    grid_h, grid_w = height // p, width // p
    # (H, W, C) -> (cell_row, row_in_cell, patch_row, cell_col, col_in_cell, patch_col, C)
    tiles = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3)
    # -> (cell_row, cell_col, row_in_cell, col_in_cell, C, patch_row, patch_col): channel-first patches
    tiles = tiles.transpose(0, 3, 1, 4, 6, 2, 5)
    patches = np.ascontiguousarray(tiles).reshape(grid_h * grid_w, 3 * p * p)
    return torch.from_numpy(patches), (grid_h, grid_w)


@dataclasses.dataclass
class PackedImages:
    """A batch of images as one packed sequence."""

    pixel_values: torch.Tensor  # (num_patches, 3*14*14)
    grid_hw: torch.Tensor  # (num_images, 2) long

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    def to(self, device: torch.device | str) -> PackedImages:
        return PackedImages(self.pixel_values.to(device), self.grid_hw.to(device))


def pack(images: list[tuple[torch.Tensor, tuple[int, int]]]) -> PackedImages:
    """Concatenate `image_to_patches` results into one sequence."""
    if not images:
        raise ValueError("cannot pack an empty list of images")
    return PackedImages(pixel_values=torch.cat([patches for patches, _ in images]),
                        grid_hw=torch.tensor([grid for _, grid in images], dtype=torch.long))


def visual_tokens(vit: Any, images: list[Image.Image], head: Any = None) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Each image's merged visual tokens (T_i, width) from a frozen Seed-ViT, passed through `head` (the
    VLM's adapter) when given, and each image's token grid (rows, cols), row-major: what the probes read."""
    with torch.inference_mode():
        packed = pack([image_to_patches(image, vit.config) for image in images])
        device = next(vit.parameters()).device
        out = vit(packed.pixel_values.to(device), packed.grid_hw.to(device))
        pooled = head(out.pooled) if head is not None else out.pooled
        pooled = pooled.float().cpu().numpy()
    offsets = out.pooled_cu_seqlens.tolist()
    merge = vit.config.merge_size
    grids = [(int(h) // merge, int(w) // merge) for h, w in packed.grid_hw.tolist()]
    return [pooled[a:b] for a, b in zip(offsets[:-1], offsets[1:])], grids
