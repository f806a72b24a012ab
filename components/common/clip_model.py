"""Loading an open_clip model (any architecture name, weights from a local file) and scoring
image-text pairs with it; shared by the scorer-training step and the CLIP-score filter.

Architectures are open_clip's own names (`ViT-L-14`, ...) or ours in `configs/open_clip/*.json`.
Weights never come from a hub: a local file (open_clip checkpoint, `.pt` or `.safetensors`) or none
(a freshly initialised model, for training it here).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.common.torchvision_compat import ensure_torchvision_importable
from components.schema import CONFIG_DIR

OPEN_CLIP_CONFIGS = CONFIG_DIR / "open_clip"


@dataclass
class ClipBundle:
    model: Any  # open_clip.CLIP
    preprocess: Any  # PIL image -> tensor (squash-resize: no content is cropped away)
    tokenizer: Any
    architecture: str


def load_clip(architecture: str, weights: str = "", device: str = "cpu") -> ClipBundle:
    """Build `architecture` and load `weights` (a local file) into it; empty weights: random init."""
    ensure_torchvision_importable()
    import open_clip

    open_clip.add_model_config(OPEN_CLIP_CONFIGS)
    if architecture not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {architecture!r}: use an open_clip model name "
                         f"or add configs/open_clip/{architecture}.json")
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP weights file {weights} does not exist (weights are never downloaded here)")
    if weights.endswith(".safetensors"):  # ours: a plain state dict, loaded without pickle
        from safetensors.torch import load_file

        model = open_clip.create_model(architecture, device=device)
        model.load_state_dict(load_file(weights, device=device))
    else:  # an open_clip checkpoint on disk, loaded by open_clip itself
        model = open_clip.create_model(architecture, pretrained=weights or None, device=device)
    model.eval()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode="squash")
    return ClipBundle(model, preprocess, open_clip.get_tokenizer(architecture), architecture)


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def pair_scores(bundle: ClipBundle, images: list[Image.Image], captions: list[str]) -> np.ndarray:
    """Cosine similarity of each image with its own caption, in [-1, 1]."""
    import torch

    with torch.inference_mode():
        pixels = torch.stack([bundle.preprocess(image) for image in images])
        tokens = bundle.tokenizer(captions)
        image_features = bundle.model.encode_image(pixels, normalize=True)
        text_features = bundle.model.encode_text(tokens, normalize=True)
        return (image_features * text_features).sum(dim=-1).float().numpy()


def scores_against(bundle: ClipBundle, images: list[Image.Image], caption_sets: list[list[str]]) -> list[np.ndarray]:
    """Cosine similarity of each image with the caption at its index in each set; images encoded once."""
    import torch

    with torch.inference_mode():
        pixels = torch.stack([bundle.preprocess(image) for image in images])
        image_features = bundle.model.encode_image(pixels, normalize=True)
        return [(image_features * bundle.model.encode_text(bundle.tokenizer(captions), normalize=True)).sum(dim=-1)
                .float().numpy() for captions in caption_sets]
