"""What Seed-ViT trains against: the MIM teacher (a frozen open_clip image tower), the heads and the
text tower of the contrastive phases, and the losses, each returned as a named term.

- MIM: a share of patches is replaced by the mask token; a linear head maps Seed-ViT's patch features
  at the masked positions to the teacher's patch features (the teacher sees the whole image at its own
  resolution; its token grid is bilinearly resized to Seed-ViT's native grid), loss 1 - cosine.
- SigLIP: image features (mean of the pooled tokens) and text features (the text tower) are projected
  into one space, L2-normalised, and every pair of the batch scored with sigmoid(scale * cos + bias);
  scale starts at log 10 (learned in log space), bias at -10. Pairs whose captions are identical count
  as positives. The video phase uses the same loss with a clip's frames averaged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from components.vit.config import TeacherConfig, TextTowerConfig, VitPretrainConfig
from components.vit.model import SeedViT, ViTOutput, patch_positions, pooled_image_features


def resolve_weights(weights: str, scorer_dir: str | None) -> str:
    """`scorer` -> the data stage's scorer weights; a path stays; empty stays empty (random init)."""
    if weights != "scorer":
        return weights
    if not scorer_dir:
        raise ValueError("weights: scorer needs the clip_scorer step's output (enable data.clip_scorer) "
                         "or give a local open_clip checkpoint path instead")
    return f"{scorer_dir}/model.safetensors"


class Teacher:
    """A frozen open_clip image tower whose last block's spatial feature map is the MIM target. Any
    tower with `forward_intermediates` works: open_clip's ViTs, timm towers (EVA02, ...) and ResNets."""

    def __init__(self, config: TeacherConfig, scorer_dir: str | None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from components.common.clip_model import load_clip

        bundle = load_clip(config.architecture, resolve_weights(config.weights, scorer_dir))
        self.visual, self.preprocess = bundle.model.visual, bundle.preprocess
        if not hasattr(self.visual, "forward_intermediates"):
            raise ValueError(f"teacher {config.architecture!r}: its image tower has no forward_intermediates, "
                             "so no patch features can be taken from it; choose an open_clip ViT or timm tower")
        self.visual.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        size = self.visual.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.dim = int(self._feature_maps(torch.zeros(1, 3, height, width)).shape[1])

    @torch.no_grad()
    def _feature_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> (batch, dim, grid_h, grid_w) from the last block."""
        out = self.visual.forward_intermediates(pixels.to(self.device, self.dtype), indices=1,
                                                intermediates_only=True, output_fmt="NCHW")
        return out["image_intermediates"][-1].float()

    @torch.no_grad()
    def patch_targets(self, images: list[Image.Image], grid_hw: torch.Tensor, merge_size: int) -> torch.Tensor:
        """(num_patches, teacher_dim) targets in Seed-ViT's packed patch order."""
        maps = self._feature_maps(torch.stack([self.preprocess(image) for image in images]))
        positions = patch_positions(grid_hw, merge_size).to(maps.device)
        targets, start = [], 0
        for index, (h, w) in enumerate(grid_hw.tolist()):
            resized = F.interpolate(maps[index:index + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
            rows, cols = positions[start:start + h * w].unbind(-1)
            targets.append(resized[:, rows, cols].T)
            start += h * w
        return torch.cat(targets)


class TextTower(nn.Module):
    """An open_clip architecture's text transformer (its vision tower dropped)."""

    def __init__(self, config: TextTowerConfig, scorer_dir: str | None) -> None:
        super().__init__()
        from components.common.clip_model import load_clip

        bundle = load_clip(config.architecture, resolve_weights(config.weights, scorer_dir))
        clip = bundle.model
        clip.visual = None  # only the text side is trained here
        for unused in ("logit_scale", "logit_bias"):  # CLIP's own softmax temperature; SigLIP has its own
            if hasattr(clip, unused):
                delattr(clip, unused)
        self.clip = clip
        self.tokenizer = bundle.tokenizer
        self.out_dim = int(clip.text_projection.shape[-1] if clip.text_projection is not None else clip.transformer.width)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)


class PretrainModel(nn.Module):
    """Seed-ViT plus everything its pretraining phases train (one module, so one DeepSpeed engine)."""

    def __init__(self, config: VitPretrainConfig, teacher_dim: int, scorer_dir: str | None) -> None:
        super().__init__()
        self.vit = SeedViT(config.vit)
        width = config.vit.width
        self.mim_head = nn.Linear(width, teacher_dim)
        self.text = TextTower(config.text, scorer_dir)
        self.image_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.embed_dim))
        self.text_proj = nn.Linear(self.text.out_dim, config.embed_dim)
        # shape (1,), not scalars: DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot give
        self.logit_scale = nn.Parameter(torch.full((1,), float(torch.log(torch.tensor(10.0)))))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))

    def forward(self, phase: str, **batch: Any) -> dict[str, torch.Tensor]:
        """The loss terms of one phase's batch (through forward, so DeepSpeed's ZeRO-3 hooks see every call)."""
        if phase == "mim":
            return self.mim_loss(**batch)
        if phase in ("siglip", "video"):
            return self.siglip_loss(**batch)
        raise ValueError(f"unknown phase {phase!r}")

    def encode_images(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor,
                      frames_per_item: torch.Tensor | None = None) -> torch.Tensor:
        """(items, embed_dim) normalised; frames_per_item groups consecutive images into one clip."""
        features = pooled_image_features(self.vit(pixel_values, grid_hw))
        if frames_per_item is not None:
            frames_per_item = frames_per_item.to(features.device)
            owner = torch.repeat_interleave(torch.arange(len(frames_per_item), device=features.device), frames_per_item)
            sums = features.new_zeros(len(frames_per_item), features.shape[-1]).index_add_(0, owner, features)
            features = sums / frames_per_item[:, None].to(features.dtype)
        return F.normalize(self.image_proj(features), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def mim_loss(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor, mask: torch.Tensor,
                 targets: torch.Tensor) -> dict[str, torch.Tensor]:
        output: ViTOutput = self.vit(pixel_values, grid_hw, mask=mask)
        predicted = self.mim_head(output.hidden_states[mask])
        cosine = F.cosine_similarity(predicted.float(), targets[mask].float(), dim=-1)
        return {"mim_loss": (1.0 - cosine).mean()}

    def siglip_loss(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor, tokens: torch.Tensor,
                    positives: torch.Tensor, frames_per_item: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image = self.encode_images(pixel_values, grid_hw, frames_per_item)
        text = self.encode_text(tokens)
        return {"siglip_loss": siglip_loss(image, text, positives, self.logit_scale, self.logit_bias)}


def same_caption(captions: list[str]) -> torch.Tensor:
    """(n, n) bool: pairs whose caption strings are identical (the positives of the sigmoid loss)."""
    return torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.bool)


def siglip_loss(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """The sigmoid loss over all image-text pairs of the batch (mean over images of the sum over texts)."""
    logits = logit_scale.exp() * image.float() @ text.float().T + logit_bias
    labels = positives.to(logits.device).float() * 2 - 1  # +1 for pairs with the same caption, -1 otherwise
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def random_patch_mask(grid_hw: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(num_patches,) bool: in each image, round(ratio * patches) patches (at least one) chosen at random."""
    masks = []
    for h, w in grid_hw.tolist():
        count = h * w
        chosen = torch.randperm(count, generator=generator)[:max(1, round(ratio * count))]
        mask = torch.zeros(count, dtype=torch.bool)
        mask[chosen] = True
        masks.append(mask)
    return torch.cat(masks)


def load_exported(folder: str | Any) -> tuple[PretrainModel, dict[str, Any]]:
    """A plain exported checkpoint (`vit.safetensors`, `towers.safetensors`, `config.json`) as a model in
    eval mode, with no training stack and no pickles; the text tower's architecture comes from the config."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from components.vit.config import SeedViTConfig

    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text())
    if saved.get("architecture") != "seed_vit":
        raise ValueError(f"{folder}/config.json is not a Seed-ViT export (architecture={saved.get('architecture')!r})")
    text = TextTowerConfig(**{**saved["text"], "weights": ""})
    config = VitPretrainConfig(vit=SeedViTConfig(**saved["vit"]), embed_dim=saved["embed_dim"], text=text)
    model = PretrainModel(config, int(saved["teacher_dim"]), scorer_dir=None)
    model.vit.load_state_dict(load_file(str(folder / "vit.safetensors")))
    missing, unexpected = model.load_state_dict(load_file(str(folder / "towers.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("vit.")]
    if missing or unexpected:
        raise ValueError(f"{folder}: towers.safetensors does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.eval(), saved
