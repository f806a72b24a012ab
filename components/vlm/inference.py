"""Running an exported VLM for inference, shared by every step that asks it questions (evaluation,
rejection sampling, RL's rollout and scoring groups, model-written captions in curation) and kept apart from
any one of them: the export loaded where this worker can run it, and one question with its PNG-encoded
pictures or frames as a generation-engine request in the chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from components.vlm.data import decode_png


def load_for_inference(checkpoint: str | Path) -> tuple[Any, Any]:
    """The export on a GPU in bf16 when this worker has one, else on the CPU in fp32."""
    from components.vlm.model import load_vlm

    if torch.cuda.is_available():
        model, tokenizer, _ = load_vlm(checkpoint, "cuda", torch.bfloat16)
    else:
        model, tokenizer, _ = load_vlm(checkpoint)
    return model, tokenizer


def generation_request(engine: Any, tokenizer: Any, question: str, images: Any, stamps: Any, system: str | None,
                       sampling: Any) -> Any:
    """One row's question with its PNG-encoded images (or frames with their times) as a generation request in
    the chat template, under `system`."""
    from components.generation.engine import GenerationInput
    from components.vlm.conversation import prompt_ids
    from components.vlm.data import image_token_count, images_to_vit_input

    vit_cfg = engine.model.vit.config
    pictures = [decode_png(bytes(data)) for data in images]
    ids, used = prompt_ids(tokenizer=tokenizer, question=question,
                           image_token_counts=[image_token_count(p, vit_cfg) for p in pictures],
                           frame_timestamps=[float(t) for t in stamps] or None, system=system)
    packed = images_to_vit_input(pictures[:len(used)], vit_cfg)
    return GenerationInput(ids, packed.pixel_values if packed else None, packed.grid_hw if packed else None, sampling)
