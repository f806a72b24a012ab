"""The vision-language model: Seed-ViT -> 2x2 average pooling -> 2-layer MLP adapter -> a Hugging Face
decoder-only mixture-of-experts LLM, with image features spliced in at the `<|image_pad|>` tokens; the
LLM built from config or loaded from a pretrained folder; export and load as plain files.

Training sequences are packed (position ids restart at every sample and no attention mask is passed, so
transformers keeps attention inside each sample); the loss is the next-token cross-entropy on answer
tokens only (labels -100 elsewhere) plus the router's load-balancing loss times its coefficient.
An export is `vit.safetensors` + `adapter.safetensors` + `llm/` (Hugging Face `save_pretrained`, with
the tokenizer) + `config.json`; `load_vlm` reads it back with no DeepSpeed, Ray or pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.common.torchvision_compat import ensure_torchvision_importable
from components.vit.config import SeedViTConfig
from components.vit.model import SeedViT
from components.vlm.config import LOSS_REDUCTIONS, LlmConfig

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
EXPORT_ARCHITECTURE = "seedvl_vlm"


def quiet_transformers() -> None:
    """transformers' import guard for torchvision, and no progress bars in job logs."""
    ensure_torchvision_importable()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_llm(config: LlmConfig, vocab_size: int, pad_id: int) -> Any:
    """A randomly initialised MoE causal LM of `config.model_type` with `vocab_size` tokens."""
    quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {
        "vocab_size": vocab_size, "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": config.rope_theta,
        "router_aux_loss_coef": config.router_aux_loss_coef, "output_router_logits": True,
        "tie_word_embeddings": True, "pad_token_id": pad_id, "bos_token_id": None, "eos_token_id": None,
    }
    moe = {  # the names each family uses for the expert count, width and top-k
        "qwen3_moe": {"num_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
                      "moe_intermediate_size": config.moe_intermediate_size, "decoder_sparse_step": 1},
        "qwen2_moe": {"num_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
                      "moe_intermediate_size": config.moe_intermediate_size, "decoder_sparse_step": 1,
                      "shared_expert_intermediate_size": config.moe_intermediate_size},
        # these two size every MLP (all of them experts) with intermediate_size
        "mixtral": {"num_local_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
                    "intermediate_size": config.moe_intermediate_size},
        "olmoe": {"num_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
                  "intermediate_size": config.moe_intermediate_size},
    }
    if config.model_type not in moe:
        raise ValueError(f"train.vlm.llm.model_type={config.model_type!r} cannot be built from config; use one of "
                         f"{sorted(moe)} or give a pretrained folder in train.vlm.llm.pretrained_path")
    hf_config = AutoConfig.for_model(config.model_type, **{**sizes, **moe[config.model_type]})
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")


def load_llm(folder: str | Path, dtype: torch.dtype = torch.float32, safetensors_only: bool = False) -> Any:
    """A pretrained causal LM from a local Hugging Face folder, router logits on (for the balancing loss);
    with `safetensors_only`, a folder holding only pickled weights is refused rather than unpickled."""
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa",
                                                 **({"use_safetensors": True} if safetensors_only else {}))
    model.config.output_router_logits = hasattr(model.config, "router_aux_loss_coef")
    if not model.config.output_router_logits:
        log.warning("%s is not a mixture-of-experts model (no router); training it without a balancing loss", folder)
    return model


class MlpAdapter(nn.Module):
    """The 2-layer MLP from the ViT's width to the LLM's; with `output_norm`, a LayerNorm at the output whose
    gain starts at the scale of the LLM's token embeddings, so image tokens enter the LLM's residual stream
    at the size text tokens do (unnormalised, they start ~15x larger and the LLM's layers barely move them).

    With `position_buckets` B > 0, each token also gets where it sits in its image: a learned row embedding
    and a learned column embedding, indexed by the token's centre as a fraction of the image's height and width
    cut into B buckets, added to the MLP's output. Seed-ViT's 2D RoPE makes its features depend on relative
    offsets only (the `cell_position` probe reads a token's third of the image at chance from them), and the
    LLM sees the tokens in row-major order with 1D positions and an image-dependent row length, so without
    this nothing tells it where a token is in the [0, 999] frame grounding answers in. Fractions of the
    image rather than cell indices, since images of any size share that frame (as Qwen2-VL's M-RoPE gives the
    LLM rows and columns, and LLaVA-NeXT a token at each row's end).

    `position_scale` multiplies the added embeddings (init and learned alike): Adam moves each weight by
    about the learning rate whatever its size, so a scale below 1 keeps them that much smaller than the
    content they are added to.

    With `position_frequencies` K > 0, the same centre fractions (y, x) enter the MLP instead, beside the
    normalised ViT features: sin and cos of pi * 2^k * y and of pi * 2^k * x for k < K (4K inputs, in [-1, 1]
    like the normalised features). The MLP mixes place and content and the output norm keeps the token at the
    text embeddings' scale, where added embeddings grow with training to the content's size (on the small
    profile the learned row and column embeddings reach norms of 0.45-0.64 each, the normalised content ~0.7).
    Measured: the inputs keep the captions' image use that the added embeddings cost, but teach grounding no
    better than no positions (README, "Where is a token?")."""

    def __init__(self, vit_width: int, llm_width: int, hidden: int = 0, output_norm: bool = False,
                 position_buckets: int = 0, position_frequencies: int = 0, position_scale: float = 1.0) -> None:
        super().__init__()
        if position_buckets < 0:
            raise ValueError(f"position_buckets must be >= 0, got {position_buckets}")
        if position_frequencies < 0:
            raise ValueError(f"position_frequencies must be >= 0, got {position_frequencies}")
        hidden = hidden or llm_width
        self.norm = nn.LayerNorm(vit_width)
        self.position_frequencies = position_frequencies
        self.fc1 = nn.Linear(vit_width + 4 * position_frequencies, hidden)
        self.fc2 = nn.Linear(hidden, llm_width)
        self.out_norm = nn.LayerNorm(llm_width) if output_norm else None
        if position_scale <= 0:
            raise ValueError(f"position_scale must be > 0, got {position_scale}")
        self.position_buckets, self.position_scale = position_buckets, float(position_scale)
        if position_buckets:
            self.row_embedding = nn.Embedding(position_buckets, llm_width)
            self.col_embedding = nn.Embedding(position_buckets, llm_width)
            nn.init.normal_(self.row_embedding.weight, std=0.02)
            nn.init.normal_(self.col_embedding.weight, std=0.02)

    def forward(self, features: torch.Tensor, grid_hw: torch.Tensor | None = None, merge_size: int = 2) -> torch.Tensor:
        """Adapter output of the pooled tokens of the images whose patch grids are `grid_hw` (row-major cells
        of merge_size x merge_size patches, images in order); `grid_hw` is needed only with positions."""
        if (self.position_buckets or self.position_frequencies) and grid_hw is None:
            raise ValueError("an adapter with positions needs each image's patch grid (grid_hw)")
        inputs = self.norm(features)
        if self.position_frequencies:
            places = position_features(token_centres(grid_hw, merge_size), self.position_frequencies)
            if places.shape[0] != inputs.shape[0]:
                raise ValueError(f"{inputs.shape[0]} tokens for grids holding {places.shape[0]}")
            inputs = torch.cat([inputs, places.to(device=inputs.device, dtype=inputs.dtype)], dim=-1)
        out = self.fc2(F.gelu(self.fc1(inputs)))
        out = self.out_norm(out) if self.out_norm is not None else out
        if not self.position_buckets:
            return out
        rows, cols = token_buckets(grid_hw, merge_size, self.position_buckets, out.device)
        if rows.shape[0] != out.shape[0]:
            raise ValueError(f"{out.shape[0]} tokens for grids holding {rows.shape[0]}")
        placed = self.row_embedding(rows) + self.col_embedding(cols)
        return out + (self.position_scale * placed).to(out.dtype)


def token_centres(grid_hw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(tokens, 2) float64: every pooled token's centre as a fraction of its image's height and width, (y, x)
    in (0, 1), row-major within each image, images in order."""
    centres = [torch.zeros(0, 2, dtype=torch.float64)]
    for h, w in (grid_hw.detach().cpu() // merge_size).tolist():
        y = (torch.arange(h, dtype=torch.float64) + 0.5) / h
        x = (torch.arange(w, dtype=torch.float64) + 0.5) / w
        centres.append(torch.stack([y.repeat_interleave(w), x.repeat(h)], dim=-1))
    return torch.cat(centres)


def position_features(centres: torch.Tensor, frequencies: int) -> torch.Tensor:
    """(tokens, 4 * frequencies): sin and cos of pi * 2^k * y, then of pi * 2^k * x, for k < frequencies."""
    scales = torch.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float64)
    angles = centres[:, :, None] * scales  # (tokens, 2, K)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1).float()


def token_buckets(grid_hw: torch.Tensor, merge_size: int, buckets: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(row bucket, column bucket) of every pooled token of the images, row-major within each image: the
    token's centre as a fraction of its image's rows / columns, times `buckets`, floored."""
    centres = token_centres(grid_hw, merge_size)
    buckets_of = (centres * buckets).long().clamp(max=buckets - 1).to(device)
    return buckets_of[:, 0], buckets_of[:, 1]


@dataclasses.dataclass
class VlmLoss:
    loss: torch.Tensor  # what backpropagates: lm_loss + coefficient * aux_loss
    lm_loss: torch.Tensor  # mean cross-entropy over answer tokens
    aux_loss: torch.Tensor  # the router's load-balancing loss (0 for a dense LLM)
    answer_tokens: int


class VisionLanguageModel(nn.Module):
    def __init__(self, vit: SeedViT, llm: Any, image_pad_id: int, adapter_hidden: int = 0,
                 adapter_output_norm: bool = False, adapter_position_buckets: int = 0,
                 adapter_position_frequencies: int = 0, adapter_position_scale: float = 1.0) -> None:
        super().__init__()
        self.vit = vit
        self.llm = llm
        self.adapter = MlpAdapter(vit.config.width, llm.config.hidden_size, adapter_hidden, adapter_output_norm,
                                  adapter_position_buckets, adapter_position_frequencies, adapter_position_scale)
        if self.adapter.out_norm is not None:
            with torch.no_grad():  # start at the text embeddings' per-coordinate scale
                scale = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
                self.adapter.out_norm.weight.fill_(float(scale))
        self.image_pad_id = image_pad_id

    @property
    def aux_loss_coef(self) -> float:
        return float(getattr(self.llm.config, "router_aux_loss_coef", 0.0))

    def image_embeddings(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """(pooled tokens of all images, LLM width): ViT on the packed patches, pooled 2x2, through the adapter."""
        return self.adapter(self.vit(pixel_values, grid_hw).pooled, grid_hw, self.vit.config.merge_size)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              grid_hw: torch.Tensor | None = None, image_order: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image features written over the `<|image_pad|>` positions, in order.
        `image_order` (optional) permutes whole images first (the image-use gap's shuffled control);
        `image_features` (optional) are features computed already (visual-token redistribution)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_pad_id
        num_slots = int(slots.sum())
        if image_features is not None:
            if image_features.shape[0] != num_slots:
                raise ValueError(f"{image_features.shape[0]} image tokens for {num_slots} placeholder tokens")
            return embeds.masked_scatter(slots.unsqueeze(-1), image_features.to(embeds.dtype)) if num_slots else embeds
        if pixel_values is None or grid_hw is None or len(grid_hw) == 0:
            if num_slots:
                raise ValueError(f"{num_slots} image placeholder tokens but no images")
            return embeds
        features = self.image_embeddings(pixel_values, grid_hw)
        if image_order is not None:
            counts = (grid_hw[:, 0] * grid_hw[:, 1] // self.vit.config.merge_size ** 2).tolist()
            pieces = torch.split(features, counts)
            features = torch.cat([pieces[i] for i in image_order.tolist()])
        if features.shape[0] != num_slots:
            raise ValueError(f"{features.shape[0]} image tokens for {num_slots} placeholder tokens")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor | None = None, grid_hw: torch.Tensor | None = None,
                image_order: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                loss_reduction: str = "token") -> VlmLoss:
        """Packed batch [B, T]: next-token loss on the answer tokens, plus the balancing loss. The B packs
        run as one row (position ids keep the samples apart), and logits are made only where a label
        follows, so a long context with a large vocabulary never materialises [B, T, vocab] logits.
        `loss_reduction` weighs the answer tokens (`LOSS_REDUCTIONS`)."""
        embeds = self.embed(input_ids, pixel_values, grid_hw, image_order, image_features)
        return causal_lm_loss(self.llm, embeds, position_ids, labels, self.aux_loss_coef, loss_reduction)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy where labels are not -100 (logits at t predict labels at t+1)."""
    targets = labels[:, 1:]
    count = int((targets != IGNORE_INDEX).sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / count, count


def sample_token_weights(position_ids: torch.Tensor, label_positions: torch.Tensor, power: float) -> torch.Tensor:
    """Weight of each labelled position of a flat packed row: 1 / n ** power, n the labelled positions of the
    same sample (samples start where the position ids restart at 0)."""
    sample = torch.cumsum((position_ids == 0).long(), 0) - 1
    owner = sample[label_positions]
    counts = torch.bincount(owner)[owner].float()
    return counts.pow(-power)


def causal_lm_loss(llm: Any, embeds: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                   aux_loss_coef: float, reduction: str = "token") -> VlmLoss:
    """The answer loss of packed rows [B, T] (run as one row), computing logits only at the positions
    whose next token is labelled, plus the router's balancing loss. What backpropagates averages the answer
    tokens as `reduction` says (`LOSS_REDUCTIONS`); `lm_loss` is always the plain mean over answer tokens."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; expected one of {sorted(LOSS_REDUCTIONS)}")
    embeds = embeds.reshape(1, -1, embeds.shape[-1])
    position_ids = position_ids.reshape(1, -1)
    flat = labels.reshape(-1)
    predicting = (flat[1:] != IGNORE_INDEX).nonzero().squeeze(-1)  # position t predicts label t+1
    keep = predicting if len(predicting) else torch.zeros(1, dtype=torch.long, device=flat.device)
    out = llm(inputs_embeds=embeds, position_ids=position_ids, use_cache=False, logits_to_keep=keep)
    logits = out.logits[0]
    if len(predicting):
        per_token = F.cross_entropy(logits.float(), flat[predicting + 1], reduction="none")
        lm_loss = per_token.mean()
        if reduction == "token":
            trained = lm_loss
        else:
            weights = sample_token_weights(position_ids[0], predicting + 1, LOSS_REDUCTIONS[reduction])
            trained = (per_token * weights).sum() / weights.sum()
    else:
        lm_loss = trained = logits.sum() * 0.0
    aux = getattr(out, "aux_loss", None)
    aux = aux if aux is not None else lm_loss.new_zeros(())
    return VlmLoss(loss=trained + aux_loss_coef * aux, lm_loss=lm_loss, aux_loss=aux, answer_tokens=len(predicting))


def set_trainable(model: VisionLanguageModel, parts: list[str]) -> dict[str, int]:
    """Freeze everything but `parts` (of vit, adapter, llm); the parameter count of each part that trains."""
    counts = {}
    for part in ("vit", "adapter", "llm"):
        module = getattr(model, part)
        train = part in parts
        for parameter in module.parameters():
            parameter.requires_grad_(train)
        counts[part] = sum(p.numel() for p in module.parameters()) if train else 0
    return counts


def export_vlm(model: VisionLanguageModel, tokenizer: Any, folder: Path, summary: dict[str, Any]) -> None:
    """Write the plain checkpoint atomically (a `.tmp` sibling renamed into place)."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain = {k: v.detach().float().contiguous().clone() for k, v in model.vit.state_dict().items()}
    save_file(plain, str(tmp / "vit.safetensors"))
    save_file({k: v.detach().float().contiguous().clone() for k, v in model.adapter.state_dict().items()},
              str(tmp / "adapter.safetensors"))
    model.llm.save_pretrained(str(tmp / "llm"), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "llm"))
    config = {"architecture": EXPORT_ARCHITECTURE, "vit": dataclasses.asdict(model.vit.config),
              "adapter": {"vit_width": model.vit.config.width, "llm_width": model.llm.config.hidden_size,
                          "hidden": model.adapter.fc1.out_features,
                          "output_norm": model.adapter.out_norm is not None,
                          "position_buckets": model.adapter.position_buckets,
                          "position_frequencies": model.adapter.position_frequencies,
                          "position_scale": model.adapter.position_scale},
              "image_pad_id": model.image_pad_id, **summary}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def load_vlm(folder: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[VisionLanguageModel, Any, dict[str, Any]]:
    """An exported VLM in eval mode, with its tokenizer and saved config (safetensors only, no pickles)."""
    from safetensors.torch import load_file

    from components.vlm.tokenizer import load_tokenizer

    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text())
    if saved.get("architecture") != EXPORT_ARCHITECTURE:
        raise ValueError(f"{folder}/config.json is not a VLM export (architecture={saved.get('architecture')!r})")
    vit = SeedViT(SeedViTConfig(**saved["vit"]))
    vit.load_state_dict(load_file(str(folder / "vit.safetensors")))
    llm = load_llm(folder / "llm", dtype, safetensors_only=True)
    model = VisionLanguageModel(vit, llm, int(saved["image_pad_id"]), int(saved["adapter"]["hidden"]),
                                bool(saved["adapter"].get("output_norm", False)),
                                int(saved["adapter"].get("position_buckets", 0)),
                                int(saved["adapter"].get("position_frequencies", 0)),
                                float(saved["adapter"].get("position_scale", 1.0)))
    model.adapter.load_state_dict(load_file(str(folder / "adapter.safetensors")))
    return model.to(device=device, dtype=dtype).eval(), load_tokenizer(folder / "llm"), saved
