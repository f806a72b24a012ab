"""The model side shared by the reward model and the RL worker groups: a prompt with its images plus a
response as one scored sequence (`Sequence`), the policy's per-token log-probs and logits of a response
under teacher forcing, and the value model (the VLM with a scalar head: per-token values for the critic,
the last token's value as the reward model's score), exported as a VLM export plus `value_head.safetensors`.

Positions: a sequence is `prompt_ids + response_ids`; response token t is predicted from position
`P - 1 + t` (P the prompt length), so the log-prob, logits and value of response token t are read there:
the state in which the token was chosen. Each sequence runs on its own (no padding to reason about); a
batch's per-token tensors are padded afterwards (`pad_rows`) for the algorithm's (B, T) functions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_META = "value_head.json"


@dataclasses.dataclass
class Sequence:
    """One prompt (ids with the image tokens expanded, its images' patches) and one response's token ids."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None  # (num_patches, 3*14*14)
    grid_hw: torch.Tensor | None  # (num_images, 2)
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_prompt(model: Any, tokenizer: Any, question: str, images: Any, stamps: Any,
                  system: str | None) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """A question with its PNG-encoded images (or frames and their times) in the chat template, as the
    generation engine is asked it: (prompt ids, pixel values, grid)."""
    from components.generation.engine import SamplingParams
    from components.vlm.inference import generation_request

    engine_like = type("EngineLike", (), {"model": model})()  # generation_request reads only `.model.vit`
    request = generation_request(engine_like, tokenizer, question, images, stamps, system, SamplingParams(max_tokens=1))
    return request.prompt_ids, request.pixel_values, request.grid_hw


def answer_ids(tokenizer: Any, answer: str, max_tokens: int) -> list[int]:
    """An answer's ids as training writes them (the text, then `<|im_end|>`), at most `max_tokens`."""
    from components.vlm.tokenizer import IM_END

    ids = list(tokenizer(f"{answer}{IM_END}", add_special_tokens=False)["input_ids"])
    return ids[:max_tokens]


def sequence_inputs(vlm: Any, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embeddings with the images spliced in, position ids) of prompt + response, on the model's device."""
    device = vlm.adapter.fc1.weight.device
    ids = torch.tensor([seq.prompt_ids + seq.response_ids], device=device)
    dtype = next(vlm.vit.parameters()).dtype
    embeds = vlm.embed(ids, seq.pixel_values.to(device, dtype) if seq.pixel_values is not None else None,
                       seq.grid_hw.to(device) if seq.grid_hw is not None else None)
    return embeds, torch.arange(ids.shape[1], device=device)[None]


def hidden_states(vlm: Any, seq: Sequence) -> torch.Tensor:
    """The LLM's last hidden states over the whole sequence, (P + L, hidden)."""
    embeds, positions = sequence_inputs(vlm, seq)
    out = vlm.llm.model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    return out.last_hidden_state[0]


def response_positions(seq: Sequence, device: torch.device) -> torch.Tensor:
    """The positions whose outputs predict the response tokens, (L,)."""
    start = len(seq.prompt_ids) - 1
    return torch.arange(start, start + len(seq.response_ids), device=device)


def response_logits(vlm: Any, seq: Sequence, temperature: float = 1.0) -> torch.Tensor:
    """Logits (divided by the rollout temperature, as the engine's log-probs are) of the response tokens'
    positions, (L, vocab)."""
    embeds, positions = sequence_inputs(vlm, seq)
    keep = response_positions(seq, embeds.device)
    out = vlm.llm(inputs_embeds=embeds, position_ids=positions, use_cache=False, logits_to_keep=keep)
    return out.logits[0].float() / temperature


def token_logprobs(logits: torch.Tensor, response_ids: list[int]) -> torch.Tensor:
    """Log-probs of the response tokens under (L, vocab) logits, (L,)."""
    targets = torch.tensor(response_ids, device=logits.device)
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


def pad_rows(rows: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row tensors of different lengths (L_b, ...) as one right-padded (B, T, ...) tensor and its (B, T)
    mask; gradients flow through."""
    if not rows:
        return torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool)
    padded = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)
    mask = torch.zeros(padded.shape[:2], dtype=torch.bool, device=padded.device)
    for index, row in enumerate(rows):
        mask[index, :row.shape[0]] = True
    return padded, mask


class ValueModel(nn.Module):
    """A VLM with a scalar head on the LLM's last hidden state: per-token values (the critic) and the
    sequence's score, its last token's value (the reward model)."""

    def __init__(self, vlm: Any) -> None:
        super().__init__()
        self.vlm = vlm
        self.head = nn.Linear(vlm.llm.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (vlm.llm.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def values(self, seq: Sequence) -> torch.Tensor:
        """(L,) values of the response tokens' states."""
        hidden = hidden_states(self.vlm, seq)
        return self.head(hidden[response_positions(seq, hidden.device)].to(self.head.weight.dtype))[:, 0].float()

    def score(self, seq: Sequence) -> torch.Tensor:
        """The raw score of the whole sequence: the head on its last token's state, a 0-dim tensor."""
        return self.head(hidden_states(self.vlm, seq)[-1].to(self.head.weight.dtype))[0].float()


def set_value_trainable(model: ValueModel, parts: list[str]) -> list[dict[str, Any]]:
    """Freeze the VLM but `parts`; the trainable parameters as (backbone, head) groups."""
    from components.vlm.model import set_trainable

    set_trainable(model.vlm, parts)
    backbone = [p for p in model.vlm.parameters() if p.requires_grad]
    return [{"params": backbone, "name": "backbone"}, {"params": list(model.head.parameters()), "name": "head"}]


def export_value_model(model: ValueModel, tokenizer: Any, folder: Path, summary: dict[str, Any],
                       head_meta: dict[str, Any]) -> None:
    """The VLM export (`export_vlm`, atomic) with the head's weights and `head_meta` (e.g. the score
    normalisation statistics) beside it, both written before the folder is renamed into place."""
    from safetensors.torch import save_file

    from components.vlm.model import export_vlm

    tmp = folder.with_name(folder.name + ".vtmp")
    export_vlm(model.vlm, tokenizer, tmp, summary)
    save_file({k: v.detach().float().contiguous().clone() for k, v in model.head.state_dict().items()},
              str(tmp / VALUE_HEAD_FILE))
    (tmp / VALUE_HEAD_META).write_text(json.dumps(head_meta, indent=1))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)


def load_value_model(folder: Path, device: str = "cpu") -> tuple[ValueModel, Any, dict[str, Any]]:
    """A value-model export: the model (fp32), its tokenizer and the head's metadata."""
    from safetensors.torch import load_file

    from components.vlm.model import load_vlm

    folder = Path(folder)
    if not (folder / VALUE_HEAD_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {VALUE_HEAD_FILE}: not a reward-model export")
    vlm, tokenizer, _ = load_vlm(folder, device)
    model = ValueModel(vlm)
    model.head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))
    return model.to(device), tokenizer, json.loads((folder / VALUE_HEAD_META).read_text())
