"""A tiny exported VLM with random weights, for tests of code that loads an export (serving): the real
tokenizer training, model classes and `export_vlm`, at sizes that build in about a second."""

from __future__ import annotations

from pathlib import Path

import torch

from components.common.torchvision_compat import ensure_torchvision_importable
from components.vit.config import SeedViTConfig
from components.vlm.config import LlmConfig

VIT = SeedViTConfig(width=32, depth=2, num_heads=2, min_pixels=3136, max_pixels=12544)
LLM = LlmConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                moe_intermediate_size=64, num_experts=4, experts_per_token=2, vocab_size=400,
                max_position_embeddings=4096)


def corpus() -> list[str]:
    colors, shapes = ("red", "blue", "green", "purple"), ("circle", "square", "triangle")
    texts = [f"a {c} {s} on a white background" for c in colors for s in shapes]
    texts += [f"How many {c} {s}s are there? {n}" for c in colors for s in shapes for n in range(4)]
    texts += ["Describe the image.", "What is shown in this picture?", "<box>[733, 79, 793, 156]</box>",
              "café naïve 中文 ✓", "[12.0 second]", "<think>step by step</think> so the answer is 3"]
    return texts * 3


def write_random_export(folder: Path, seed: int = 0, weight_scale: float = 0.3) -> Path:
    """An export at `folder` whose LLM has large random weights (so greedy decoding wanders through the
    vocabulary instead of repeating one token)."""
    ensure_torchvision_importable()
    from components.vit.model import SeedViT
    from components.vlm.model import VisionLanguageModel, build_llm, export_vlm
    from components.vlm.tokenizer import SpecialIds, train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus(), vocab_size=LLM.vocab_size)
    special = SpecialIds.of(tokenizer)
    model = VisionLanguageModel(SeedViT(VIT), build_llm(LLM, vocab_size=len(tokenizer), pad_id=special.pad),
                                special.image_pad)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.llm.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * weight_scale)
    export_vlm(model.eval(), tokenizer, folder, {"stage": "random", "steps": 0})
    return folder
