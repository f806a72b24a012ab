"""Seed-ViT's model and preprocessing at toy sizes on CPU: packing, 2D RoPE, pooling, masks, configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.vit.config import SeedViTConfig
from components.vit.model import (SeedViT, ViTOutput, VisionRotaryEmbedding, apply_rotary, count_parameters,
                                  cu_seqlens_from_grid, patch_positions)
from components.vit.preprocess import CLIP_MEAN, CLIP_STD, image_to_patches, native_size, pack

FACTOR = 28  # patch_size * merge_size
# one 2x2 cell, a 1-cell-wide tall strip, a 3:1 landscape and an ordinary grid
GRIDS = [(2, 2), (12, 2), (4, 12), (6, 8)]
ATOL = 1e-5


def tiny_config(attention: str = "sdpa_segments", **overrides: int) -> SeedViTConfig:
    return SeedViTConfig(width=32, depth=2, num_heads=4, attention=attention, **overrides)


def tiny_model(attention: str = "sdpa_segments", seed: int = 0) -> SeedViT:
    torch.manual_seed(seed)
    model = SeedViT(tiny_config(attention)).eval()
    with torch.no_grad():  # a non-zero mask token and LayerNorm affines, so no test passes by a zero
        model.mask_token.normal_()
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def random_batch(grids: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_hw) of random patches for the given grids."""
    generator = torch.Generator().manual_seed(seed)
    grid_hw = torch.tensor(grids, dtype=torch.long)
    num_patches = int((grid_hw[:, 0] * grid_hw[:, 1]).sum())
    return torch.randn(num_patches, 3 * 14 * 14, generator=generator), grid_hw


def image_slices(output: ViTOutput, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's (hidden_states, pooled) rows out of a packed output."""
    start, end = output.cu_seqlens[index].item(), output.cu_seqlens[index + 1].item()
    pooled_start, pooled_end = output.pooled_cu_seqlens[index].item(), output.pooled_cu_seqlens[index + 1].item()
    return output.hidden_states[start:end], output.pooled[pooled_start:pooled_end]


@pytest.fixture(scope="module")
def models() -> dict[str, SeedViT]:
    """One set of weights under both CPU attention backends."""
    segments = tiny_model("sdpa_segments")
    masked = SeedViT(tiny_config("sdpa_mask")).eval()
    masked.load_state_dict(segments.state_dict())
    return {"sdpa_segments": segments, "sdpa_mask": masked}


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("backend", ["sdpa_segments", "sdpa_mask"])
def test_packed_equals_each_image_alone(models: dict[str, SeedViT], backend: str) -> None:
    model = models[backend]
    pixel_values, grid_hw = random_batch(GRIDS)
    with torch.no_grad():
        packed = model(pixel_values, grid_hw)
        offsets = cu_seqlens_from_grid(grid_hw).tolist()
        assert packed.hidden_states.shape == (offsets[-1], 32)
        assert packed.pooled.shape == (offsets[-1] // 4, 32)
        for i in range(len(GRIDS)):
            alone = model(pixel_values[offsets[i]:offsets[i + 1]], grid_hw[i:i + 1])
            hidden, pooled = image_slices(packed, i)
            torch.testing.assert_close(hidden, alone.hidden_states, atol=ATOL, rtol=0)
            torch.testing.assert_close(pooled, alone.pooled, atol=ATOL, rtol=0)


def test_backends_and_padded_agree(models: dict[str, SeedViT]) -> None:
    pixel_values, grid_hw = random_batch(GRIDS, seed=1)
    with torch.no_grad():
        reference = models["sdpa_segments"](pixel_values, grid_hw)
        for output in (models["sdpa_mask"](pixel_values, grid_hw),
                       models["sdpa_segments"].forward_padded(pixel_values, grid_hw)):
            torch.testing.assert_close(output.hidden_states, reference.hidden_states, atol=ATOL, rtol=0)
            torch.testing.assert_close(output.pooled, reference.pooled, atol=ATOL, rtol=0)
            assert torch.equal(output.cu_seqlens, reference.cu_seqlens)
            assert torch.equal(output.pooled_cu_seqlens, reference.pooled_cu_seqlens)


@pytest.mark.parametrize("backend", ["sdpa_segments", "sdpa_mask"])
def test_no_attention_across_images(models: dict[str, SeedViT], backend: str) -> None:
    model = models[backend]
    pixel_values, grid_hw = random_batch(GRIDS, seed=2)
    offsets = cu_seqlens_from_grid(grid_hw).tolist()
    changed = pixel_values.clone()
    changed[offsets[2]:offsets[3]] += torch.randn(offsets[3] - offsets[2], pixel_values.shape[1])
    with torch.no_grad():
        before, after = model(pixel_values, grid_hw), model(changed, grid_hw)
    for i in range(len(GRIDS)):
        (hidden_before, pooled_before), (hidden_after, pooled_after) = image_slices(before, i), image_slices(after, i)
        if i == 2:
            assert not torch.allclose(hidden_before, hidden_after, atol=1e-3)
        else:
            torch.testing.assert_close(hidden_after, hidden_before, atol=1e-6, rtol=0)
            torch.testing.assert_close(pooled_after, pooled_before, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 2D rotary embedding


def rotated_dot(rotary: VisionRotaryEmbedding, q: torch.Tensor, k: torch.Tensor, query_at: tuple[int, int],
                key_at: tuple[int, int]) -> torch.Tensor:
    """q rotated at `query_at` . k rotated at `key_at`, for (heads, head_dim) vectors."""
    cos, sin = rotary(torch.tensor([query_at, key_at]))  # (2, head_dim)
    q_rot = apply_rotary(q[None], cos[:1, None], sin[:1, None])[0]
    k_rot = apply_rotary(k[None], cos[1:, None], sin[1:, None])[0]
    return (q_rot * k_rot).sum(-1)  # (heads,)


def test_rotary_depends_only_on_relative_position() -> None:
    head_dim = 16
    rotary = VisionRotaryEmbedding(head_dim)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        q, k = torch.randn(4, head_dim, generator=generator), torch.randn(4, head_dim, generator=generator)
        p1, p2 = torch.randint(0, 30, (2, 2), generator=generator).tolist()
        shift = torch.randint(-10, 40, (2,), generator=generator).tolist()
        shift[0] = max(shift[0], -min(p1[0], p2[0]))  # keep positions non-negative (not required, but realistic)
        shift[1] = max(shift[1], -min(p1[1], p2[1]))
        reference = rotated_dot(rotary, q, k, tuple(p1), tuple(p2))
        shifted = rotated_dot(rotary, q, k, (p1[0] + shift[0], p1[1] + shift[1]), (p2[0] + shift[0], p2[1] + shift[1]))
        torch.testing.assert_close(shifted, reference, atol=1e-4, rtol=1e-4)
        # the unrotated dot product at offset (0, 0)
        torch.testing.assert_close(rotated_dot(rotary, q, k, tuple(p1), tuple(p1)), (q * k).sum(-1), atol=1e-4, rtol=0)
        # a different row offset, a different column offset, and swapped offsets all change it
        for other in ((p2[0] + 1, p2[1]), (p2[0], p2[1] + 1)):
            assert (rotated_dot(rotary, q, k, tuple(p1), other) - reference).abs().max() > 1e-3
        # the same offset along rows and along columns gives different scores
        along_rows, along_columns = rotated_dot(rotary, q, k, (0, 0), (3, 0)), rotated_dot(rotary, q, k, (0, 0), (0, 3))
        assert (along_rows - along_columns).abs().max() > 1e-3


# ---------------------------------------------------------------- pooling


def test_pooling_is_avg_pool2d_of_the_feature_map(models: dict[str, SeedViT]) -> None:
    model = models["sdpa_segments"]
    pixel_values, grid_hw = random_batch(GRIDS, seed=4)
    with torch.no_grad():
        output = model(pixel_values, grid_hw)
    positions = patch_positions(grid_hw, merge_size=2)
    offsets = output.cu_seqlens.tolist()
    for i, (h, w) in enumerate(GRIDS):
        hidden, pooled = image_slices(output, i)
        rows, cols = positions[offsets[i]:offsets[i + 1]].unbind(-1)
        feature_map = torch.full((h, w, hidden.shape[-1]), float("nan"))
        feature_map[rows, cols] = hidden
        assert not feature_map.isnan().any()  # every (row, col) of the grid appears exactly once
        expected = F.avg_pool2d(feature_map.permute(2, 0, 1)[None], 2)[0]  # (C, h/2, w/2)
        torch.testing.assert_close(pooled, expected.permute(1, 2, 0).reshape(-1, hidden.shape[-1]), atol=1e-6, rtol=0)


def test_patch_positions_order() -> None:
    positions = patch_positions(torch.tensor([[2, 4]]), merge_size=2).tolist()
    assert positions == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


# ---------------------------------------------------------------- preprocessing

SIZES = [(1, 1), (1, 300), (300, 1), (1, 2000), (2000, 1), (10, 10), (27, 29), (55, 57), (100, 300), (300, 100),
         (480, 640), (1080, 1920), (1000, 3000), (3000, 1000), (4000, 3000), (10000, 10000), (17, 5000),
         (5000, 17), (333, 777)]
PIXEL_LIMITS = [(56 * 56, 1024 * 1024), (56 * 56, 448 * 448), (224 * 224, 224 * 224 * 4)]


@pytest.mark.parametrize(("min_pixels", "max_pixels"), PIXEL_LIMITS)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_native_size_bounds_and_aspect(height: int, width: int, min_pixels: int, max_pixels: int) -> None:
    h, w = native_size(height, width, FACTOR, min_pixels, max_pixels)
    assert h % FACTOR == 0 and w % FACTOR == 0 and h >= FACTOR and w >= FACTOR
    assert min_pixels <= h * w <= max_pixels, f"{height}x{width} -> {h}x{w} = {h * w} pixels"
    scale = math.sqrt(h * w / (height * width))
    if min(height, width) * scale >= 3 * FACTOR:  # neither side clamped to one cell: the aspect is kept
        # each side is off its ideal length by at most a cell (rounding), so the log-aspect by at most this much
        tolerance = math.log1p(FACTOR / h) + math.log1p(FACTOR / w)
        assert abs(math.log(h / w) - math.log(height / width)) <= tolerance, f"{height}x{width} -> {h}x{w}"
    if height == width:
        assert h == w


@pytest.mark.parametrize(("height", "width"), [(1, 40000), (40000, 1), (5, 100000)])
def test_native_size_extreme_strips_stay_under_max_pixels(height: int, width: int) -> None:
    h, w = native_size(height, width, FACTOR, 56 * 56, 1024 * 1024)
    assert h * w <= 1024 * 1024, f"{height}x{width} -> {h}x{w} = {h * w} pixels"


def test_native_size_rejects_empty_images() -> None:
    with pytest.raises(ValueError, match="positive"):
        native_size(0, 10, FACTOR, 3136, 1 << 20)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize(("height", "width"), [(100, 37), (70, 210), (1, 90), (90, 1)])
def test_image_to_patches_layout(height: int, width: int) -> None:
    config = tiny_config(max_pixels=224 * 224)
    image = random_image(height, width)
    patches, (grid_h, grid_w) = image_to_patches(image, config)
    resized_h, resized_w = native_size(height, width, FACTOR, config.min_pixels, config.max_pixels)
    assert (grid_h, grid_w) == (resized_h // 14, resized_w // 14)
    assert grid_h % 2 == 0 and grid_w % 2 == 0 and patches.shape == (grid_h * grid_w, 3 * 14 * 14)
    resized = np.asarray(image.resize((resized_w, resized_h), Image.Resampling.BILINEAR), dtype=np.float32)
    normalised = (resized / 255.0 - CLIP_MEAN) / CLIP_STD  # (H, W, 3)
    positions = patch_positions(torch.tensor([[grid_h, grid_w]]), merge_size=2).tolist()
    for i, (row, col) in enumerate(positions):
        block = normalised[row * 14:(row + 1) * 14, col * 14:(col + 1) * 14]  # (14, 14, 3)
        np.testing.assert_allclose(patches[i].numpy(), block.transpose(2, 0, 1).reshape(-1), atol=1e-6)


def test_odd_images_run_end_to_end(models: dict[str, SeedViT]) -> None:
    config = tiny_config(max_pixels=224 * 224)
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate([(300, 1), (1, 300), (84, 252), (1, 1)])]
    batch = pack([image_to_patches(image, config) for image in images])
    assert batch.grid_hw.tolist()[2][1] == 3 * batch.grid_hw.tolist()[2][0]  # 3:1 kept
    with torch.no_grad():
        output = models["sdpa_segments"](batch.pixel_values, batch.grid_hw)
    assert output.hidden_states.shape == (batch.num_patches, 32)
    assert output.pooled.shape == (batch.num_patches // 4, 32)
    assert torch.isfinite(output.hidden_states).all()
    assert output.cu_seqlens[-1].item() == batch.num_patches


def test_pack_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        pack([])


# ---------------------------------------------------------------- MIM mask


def test_mask_replaces_patch_embeddings(models: dict[str, SeedViT]) -> None:
    model = models["sdpa_segments"]
    pixel_values, grid_hw = random_batch(GRIDS, seed=5)
    mask = torch.rand(pixel_values.shape[0], generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        plain = model(pixel_values, grid_hw)
        masked = model(pixel_values, grid_hw, mask=mask)
        assert not torch.allclose(masked.hidden_states[mask], plain.hidden_states[mask], atol=1e-3)
        # a masked patch's pixels are never read
        changed = pixel_values.clone()
        changed[mask] = torch.randn(int(mask.sum()), pixel_values.shape[1])
        torch.testing.assert_close(model(changed, grid_hw, mask=mask).hidden_states, masked.hidden_states,
                                   atol=0, rtol=0)
        # all patches masked: the output depends on the grid only
        everything = torch.ones_like(mask)
        first = model(pixel_values, grid_hw, mask=everything)
        second = model(torch.randn_like(pixel_values), grid_hw, mask=everything)
        torch.testing.assert_close(second.hidden_states, first.hidden_states, atol=0, rtol=0)
        torch.testing.assert_close(second.pooled, first.pooled, atol=0, rtol=0)
        no_mask = model(pixel_values, grid_hw, mask=torch.zeros_like(mask))
        torch.testing.assert_close(no_mask.hidden_states, plain.hidden_states, atol=0, rtol=0)


def test_gradients_flow_through_packed_forward_with_mask() -> None:
    model = tiny_model("sdpa_segments").train()
    pixel_values, grid_hw = random_batch(GRIDS, seed=6)
    pixel_values.requires_grad_(True)
    mask = torch.zeros(pixel_values.shape[0], dtype=torch.bool)
    mask[::3] = True
    output = model(pixel_values, grid_hw, mask=mask)
    loss = output.pooled.pow(2).mean() + output.hidden_states.mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.equal(pixel_values.grad[mask], torch.zeros_like(pixel_values.grad[mask]))  # masked pixels unused
    assert pixel_values.grad[~mask].abs().sum() > 0


# ---------------------------------------------------------------- configs


def test_full_config_has_532m_parameters() -> None:
    with torch.device("meta"):
        model = SeedViT(SeedViTConfig())
    assert abs(count_parameters(model) - 532_000_000) <= 1_000_000, count_parameters(model)
    assert model.config.head_dim == 80 and len(model.blocks) == 27


def test_tiny_profile_size_instantiates() -> None:
    model = SeedViT(SeedViTConfig(width=96, depth=4, num_heads=4))
    assert len(model.blocks) == 4 and model.config.head_dim == 24
    pixel_values, grid_hw = random_batch([(2, 4)])
    with torch.no_grad():
        assert model(pixel_values, grid_hw).pooled.shape == (2, 96)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"width": 30, "num_heads": 4}, "vit.width"),
    ({"width": 24, "num_heads": 4}, "head width"),  # head_dim 6: not divisible by 4
    ({"attention": "flash"}, "vit.attention"),
    ({"min_pixels": 100 * 100, "max_pixels": 50 * 50}, "vit.max_pixels"),
    ({"min_pixels": 10 * 10}, "vit.min_pixels"),
    ({"depth": 0}, "vit.depth"),
])
def test_config_errors_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SeedViTConfig(**overrides)
