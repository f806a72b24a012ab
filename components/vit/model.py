"""Seed-ViT: a native-resolution vision transformer over packed, variable-length image sequences.

Design choices, in the order a reader meets them:
- Images keep their aspect ratio. `preprocess.py` resizes each so height and width are multiples of
  28 (bilinear, pixel count within [min_pixels, max_pixels]) and cuts it into 14x14 patches,
  flattened to `pixel_values` rows of 3*14*14 values. `grid_hw` holds each image's patch grid (h, w).
- Patches of one image are stored in 2x2-group order (the four patches of each 28x28 cell are
  consecutive; cells in row-major order), as in Qwen2-VL. Attention does not care about the order,
  since positions enter only through the rotary embedding, and the final 2x2 average pooling becomes a
  reshape and a mean.
- 2D rotary position embedding: half of each head's channels rotate with the patch's row, the other
  half with its column, so attention scores depend only on relative (row, column) offsets and any
  grid size works without interpolation.
- Pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual).
- Packing: the images of a batch are one sequence; `cu_seqlens` marks where each image starts and
  attention is block-diagonal (no attention across images, no padding). Backends: a variable-length
  flash kernel on GPU (`flash_attn` when installed, else torch's `varlen_attn`), per-image SDPA calls
  (CPU default) or one SDPA call with a block-diagonal mask. `forward_padded` is the padded
  alternative, kept for the packed-vs-padded benchmark.
- MIM: `mask` replaces chosen patch embeddings by a learned mask token before the blocks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from components.vit.config import SeedViTConfig


@dataclasses.dataclass
class ViTOutput:
    hidden_states: torch.Tensor  # (num_patches, width): per-patch features, after the final norm
    pooled: torch.Tensor  # (num_patches // merge_size**2, width): one token per 28x28 pixels
    cu_seqlens: torch.Tensor  # (num_images + 1,) int32: patch offsets of each image
    pooled_cu_seqlens: torch.Tensor  # (num_images + 1,) int32: pooled-token offsets of each image


def cu_seqlens_from_grid(grid_hw: torch.Tensor) -> torch.Tensor:
    """(num_images, 2) patch grids -> (num_images + 1,) int32 cumulative patch counts."""
    lengths = grid_hw[:, 0] * grid_hw[:, 1]
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def patch_positions(grid_hw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(num_patches, 2) (row, col) of every patch, in the packed 2x2-group order."""
    positions = []
    for h, w in grid_hw.tolist():
        rows = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        cols = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        # (cell_row, row_in_cell, cell_col, col_in_cell) -> (cell_row, cell_col, row_in_cell, col_in_cell)
        rows = rows.permute(0, 2, 1, 3).reshape(-1)
        cols = cols.permute(0, 2, 1, 3).reshape(-1)
        positions.append(torch.stack([rows, cols], dim=-1))
    return torch.cat(positions).to(grid_hw.device)


class PatchEmbed(nn.Module):
    """A linear map of each flattened 14x14x3 patch (the same as a stride-14 convolution)."""

    def __init__(self, patch_dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)  # (num_patches, patch_dim) -> (num_patches, width)


class VisionRotaryEmbedding(nn.Module):
    """2D RoPE angles: for each patch, head_dim/4 row frequencies and head_dim/4 column frequencies."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        quarter = head_dim // 4
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_patches, 2) positions -> cos, sin of shape (num_patches, head_dim)."""
        angles = positions.float()[:, :, None] * self.inv_freq  # (n, 2, head_dim/4)
        angles = angles.flatten(1)  # (n, head_dim/2): row angles then column angles
        angles = torch.cat([angles, angles], dim=-1)  # (n, head_dim), rotate-half layout
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., num_patches, heads, head_dim); cos/sin broadcastable to it (a heads axis of size 1)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def _flash_varlen():  # -> callable | None
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:
        return None


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     backend: str, max_len: int | None = None) -> torch.Tensor:
    """Block-diagonal attention over a packed sequence. q, k, v: (num_patches, heads, head_dim).
    `max_len` (the longest image) saves the varlen kernel a device sync when the caller knows it."""
    if backend == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)  # flash kernels take half precision only
        backend = "varlen" if q.is_cuda and half and _flash_varlen() is not None else "sdpa_segments"
    if backend == "varlen":
        kernel = _flash_varlen()
        if kernel is None or not q.is_cuda:
            raise RuntimeError("vit.attention=varlen needs a CUDA device and flash_attn or torch>=2.10's varlen_attn")
        if max_len is None:
            max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return kernel(q, k, v, cu, cu, max_len, max_len)
    if backend == "sdpa_mask":
        segment = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=q.device),
                                          (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device))
        mask = segment[:, None] == segment[None, :]  # (n, n) block-diagonal
        # 4-D inputs (a batch axis of 1): SDPA's fused kernels take only those, 3-D falls back to plain math
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)[0].transpose(0, 1)
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, len, head_dim)
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
    return torch.cat(outputs)


class VisionAttention(nn.Module):
    def __init__(self, config: SeedViTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = config.num_heads, config.head_dim, config.attention
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                max_len: int | None = None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (n, heads, head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]  # (n, 1, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = packed_attention(q, k, v, cu_seqlens, self.backend, max_len)
        return self.proj(out.reshape(n, -1))

    def forward_padded(self, x: torch.Tensor, key_padding: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
        """x (batch, max_len, width); key_padding (batch, max_len) True where a real patch is."""
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos/sin (b, len, 1, head_dim)
        mask = key_padding[:, None, None, :]  # (b, 1, 1, len)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: SeedViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = VisionMLP(config.width, int(config.width * config.mlp_ratio))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                max_len: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, max_len)
        return x + self.mlp(self.norm2(x))

    def forward_padded(self, x: torch.Tensor, key_padding: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.forward_padded(self.norm1(x), key_padding, cos, sin)
        return x + self.mlp(self.norm2(x))


class SeedViT(nn.Module):
    def __init__(self, config: SeedViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_dim, config.width)
        self.rotary = VisionRotaryEmbedding(config.head_dim, config.rope_theta)
        self.mask_token = nn.Parameter(torch.zeros(config.width))
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """2x2 average pooling: the merge_size**2 consecutive patches of each cell -> one token."""
        group = self.config.merge_size ** 2
        return hidden.view(-1, group, hidden.shape[-1]).mean(dim=1)

    def forward(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor, mask: torch.Tensor | None = None) -> ViTOutput:
        """pixel_values (num_patches, 3*14*14) packed; grid_hw (num_images, 2); mask (num_patches,) bool."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))  # (num_patches, width)
        if mask is not None:
            x = torch.where(mask[:, None], self.mask_token.to(x.dtype), x)
        cu_seqlens = cu_seqlens_from_grid(grid_hw).to(x.device)
        cos, sin = self.rotary(patch_positions(grid_hw, self.config.merge_size).to(x.device))
        max_len = int((grid_hw[:, 0] * grid_hw[:, 1]).max())  # once per forward, not once per block
        for block in self.blocks:
            x = block(x, cu_seqlens, cos, sin, max_len)
        hidden = self.norm(x)
        group = self.config.merge_size ** 2
        return ViTOutput(hidden_states=hidden, pooled=self.pool(hidden), cu_seqlens=cu_seqlens,
                         pooled_cu_seqlens=torch.div(cu_seqlens, group, rounding_mode="floor"))

    def forward_padded(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> ViTOutput:
        """The same computation with each image padded to the batch's longest (for benchmarks)."""
        cu_seqlens = cu_seqlens_from_grid(grid_hw).to(pixel_values.device)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        longest, batch = max(lengths), len(lengths)
        patches = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        x = patches.new_zeros(batch, longest, patches.shape[-1])
        key_padding = torch.zeros(batch, longest, dtype=torch.bool, device=x.device)
        positions = torch.zeros(batch, longest, 2, dtype=torch.long, device=x.device)
        all_positions = patch_positions(grid_hw, self.config.merge_size).to(x.device)
        for i, (start, length) in enumerate(zip(cu_seqlens[:-1].tolist(), lengths)):
            x[i, :length] = patches[start:start + length]
            key_padding[i, :length] = True
            positions[i, :length] = all_positions[start:start + length]
        cos, sin = self.rotary(positions.view(-1, 2))
        cos, sin = cos.view(batch, longest, 1, -1), sin.view(batch, longest, 1, -1)
        for block in self.blocks:
            x = block.forward_padded(x, key_padding, cos, sin)
        hidden = self.norm(x)[key_padding]  # back to packed rows, padding dropped
        group = self.config.merge_size ** 2
        return ViTOutput(hidden_states=hidden, pooled=self.pool(hidden), cu_seqlens=cu_seqlens,
                         pooled_cu_seqlens=torch.div(cu_seqlens, group, rounding_mode="floor"))


def pooled_image_features(output: ViTOutput) -> torch.Tensor:
    """(num_images, width): the mean of each image's pooled tokens (for contrastive heads)."""
    counts = (output.pooled_cu_seqlens[1:] - output.pooled_cu_seqlens[:-1]).long()
    image_index = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    sums = output.pooled.new_zeros(len(counts), output.pooled.shape[-1]).index_add_(0, image_index, output.pooled)
    return sums / counts[:, None].to(sums.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops_per_patch(config: SeedViTConfig, sequence_length: int) -> float:
    """Approximate forward FLOPs per patch: 2 * (weights) + attention scores (for MFU)."""
    width, hidden = config.width, int(config.width * config.mlp_ratio)
    per_block = 2 * (4 * width * width + 2 * width * hidden) + 4 * sequence_length * width
    return config.depth * per_block + 2 * config.patch_dim * width
