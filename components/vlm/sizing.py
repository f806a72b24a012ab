"""Sizing a profile on paper: parameter counts of its Seed-ViT, adapter and MoE LLM (built on the meta
device, so no memory is allocated and a 200B-parameter model builds in seconds on a laptop), and the
GPU hours a VLM stage needs at a token count and an MFU, from the usual 6 x active parameters rule.

Training FLOPs per token (attention's sequence-length term left out, so these are lower bounds; it
grows with stage 2's long sequences):
- LLM: forward 2 N_active, backward 4 N_active when its weights train; 2 N_active when only the
  gradient for the adapter flows through it (stage 0).
- Seed-ViT, per visual token (one pooled token = 4 patches of 14x14): forward 2 N_vit x 4, backward
  4 N_vit x 4 when it trains (stages 1, 2); frozen in stage 0, so forward only.
- adapter: 6 N_adapter per visual token (it always trains)."""

from __future__ import annotations

import dataclasses
from typing import Any

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16, per GPU (the anchor the MFU figures use)
PATCHES_PER_TOKEN = 4  # 2x2 pooling


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    vit: int
    adapter: int
    llm_total: int
    llm_active: int  # per token: everything but the experts, plus experts_per_token of each layer's experts

    @property
    def total(self) -> int:
        return self.vit + self.adapter + self.llm_total

    @property
    def active(self) -> int:
        return self.vit + self.adapter + self.llm_active

    def table(self) -> str:
        rows = [("Seed-ViT", self.vit), ("adapter", self.adapter), ("LLM total", self.llm_total),
                ("LLM active per token", self.llm_active), ("VLM total", self.total),
                ("VLM active per token", self.active)]
        return "\n".join(f"{name:<22}{count / 1e9:>10.3f} B" if count >= 1e9 else f"{name:<22}{count / 1e6:>10.3f} M"
                         for name, count in rows)


def count_parameters(config: Any) -> ParameterCounts:
    """Build `config`'s (a PipelineConfig) Seed-ViT, adapter and LLM on the meta device and count."""
    import torch

    from components.vit.model import SeedViT
    from components.vlm.model import MlpAdapter, build_llm

    llm_config = config.train.vlm.llm
    vit_config = config.train.vit_pretrain.vit
    with torch.device("meta"):
        vit = SeedViT(vit_config)
        llm = build_llm(llm_config, llm_config.vocab_size, 0)
        adapter = MlpAdapter(vit_config.width, llm.config.hidden_size)
    experts = sum(p.numel() for name, p in llm.named_parameters() if ".experts." in name)
    llm_total = sum(p.numel() for p in llm.parameters())  # tied embeddings counted once
    if not experts:
        raise ValueError(f"no expert parameters found in the {llm_config.model_type} LLM: cannot tell active from total")
    active = llm_total - experts + experts * llm_config.experts_per_token // llm_config.num_experts
    return ParameterCounts(vit=sum(p.numel() for p in vit.parameters()),
                           adapter=sum(p.numel() for p in adapter.parameters()), llm_total=llm_total, llm_active=active)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    name: str
    tokens: float  # training tokens (text + visual)
    visual_share: float  # the fraction of them that are visual tokens (an assumption: the paper gives none)
    vit_trains: bool
    llm_trains: bool
    mfu: tuple[float, float]  # the range of MFU to expect (public anchors)


def training_flops(counts: ParameterCounts, stage: StagePlan) -> float:
    llm = (2 + (4 if stage.llm_trains else 2)) * counts.llm_active
    vit = (2 + (4 if stage.vit_trains else 0)) * counts.vit * PATCHES_PER_TOKEN
    per_token = llm + stage.visual_share * (vit + 6 * counts.adapter)
    return per_token * stage.tokens


def gpu_hours(flops: float, mfu: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return flops / (mfu * peak_flops) / 3600.0


# The paper's token counts per VLM stage; MFU ranges from the public anchors in the design card (image
# VLM 30-40 %, video VLM 25-35 %, with packing).
PAPER_STAGES = (
    StagePlan("stage0", 16e9, 0.5, vit_trains=False, llm_trains=False, mfu=(0.30, 0.40)),
    StagePlan("stage1", 3e12, 0.5, vit_trains=True, llm_trains=True, mfu=(0.30, 0.40)),
    StagePlan("stage2", 240e9, 0.5, vit_trains=True, llm_trains=True, mfu=(0.25, 0.35)),
)


def stage_table(counts: ParameterCounts, stages: tuple[StagePlan, ...] = PAPER_STAGES) -> list[dict[str, Any]]:
    rows = []
    for stage in stages:
        flops = training_flops(counts, stage)
        low, high = stage.mfu
        rows.append({"stage": stage.name, "tokens": stage.tokens, "flops": flops,
                     "gpu_hours_at_high_mfu": gpu_hours(flops, high), "gpu_hours_at_low_mfu": gpu_hours(flops, low),
                     "mfu_range": [low, high]})
    return rows
