"""Typed configs of Seed-ViT (the architecture) and of its pretraining job (phases, optimiser, Ray
Train and DeepSpeed settings, evaluation)."""

from __future__ import annotations

import dataclasses
from components.common.resources import Resources
from components.training.config import DeepSpeedSettings

ATTENTION_BACKENDS = ("auto", "varlen", "sdpa_segments", "sdpa_mask")
PHASES = ("mim", "siglip", "video")


@dataclasses.dataclass
class SeedViTConfig:
    """Seed-ViT's shape. The defaults are the paper's 532M encoder (1280 wide, 27 blocks, 16 heads
    of 80); profiles shrink the sizes, never the code path."""

    patch_size: int = 14
    merge_size: int = 2  # 2x2 average pooling at the output: one token per 28x28 pixels
    width: int = 1280
    depth: int = 27
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    min_pixels: int = 56 * 56  # images are resized (aspect kept) to hold between min and max pixels
    max_pixels: int = 1024 * 1024
    attention: str = "auto"  # auto: a varlen flash kernel on GPU, per-image SDPA on CPU

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"vit.width ({self.width}) must be divisible by vit.num_heads ({self.num_heads})")
        if (self.width // self.num_heads) % 4:
            raise ValueError(f"the head width vit.width / vit.num_heads ({self.width // self.num_heads}) must be "
                             "divisible by 4 for the "
                             "2D rotary embedding (half for rows, half for columns, in cos/sin pairs)")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"vit.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        factor = self.patch_size * self.merge_size
        if self.min_pixels < factor * factor:
            raise ValueError(f"vit.min_pixels must be >= {factor * factor} (one {factor}x{factor} cell), "
                             f"got {self.min_pixels}")
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"vit.max_pixels ({self.max_pixels}) must be >= vit.min_pixels ({self.min_pixels})")
        if self.depth < 1 or self.patch_size < 1 or self.merge_size < 1:
            raise ValueError("vit.depth, vit.patch_size and vit.merge_size must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size * self.patch_size


@dataclasses.dataclass
class PhaseConfig:
    """One pretraining phase: how long it trains and on what batch."""

    enabled: bool = True
    steps: int = 100
    images_per_batch: int = 32  # per worker (video: clips per batch)
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    mask_ratio: float = 0.5  # MIM only: the fraction of patches replaced by the mask token
    frames_per_clip: int = 4  # video only: frames drawn evenly from each clip

    def __post_init__(self) -> None:
        if self.steps < 1 or self.images_per_batch < 1:
            raise ValueError("phase steps and images_per_batch must be >= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.frames_per_clip < 1:
            raise ValueError("frames_per_clip must be >= 1")


@dataclasses.dataclass
class TeacherConfig:
    """The MIM teacher: any open_clip image tower with local weights. `weights: scorer` uses the
    data stage's trained scorer (the tiny profile); a path loads an open_clip checkpoint from disk."""

    architecture: str = "EVA02-E-14"
    weights: str = ""


@dataclasses.dataclass
class TextTowerConfig:
    """The SigLIP text tower: an open_clip architecture's text transformer, initialised from `weights`
    (`scorer`: the data stage's scorer; a path: an open_clip checkpoint; empty: random)."""

    architecture: str = "ViT-L-14"
    weights: str = ""
    freeze: bool = False  # keep the loaded text tower fixed (only its projection trains), as LiT locks a tower


@dataclasses.dataclass
class VitPretrainConfig:
    """The ViT pretraining job: MIM, then SigLIP on image-text pairs, then video frames with captions."""

    enabled: bool = True
    vit: SeedViTConfig = dataclasses.field(default_factory=SeedViTConfig)
    embed_dim: int = 768  # the shared image-text space of the contrastive phases
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    text: TextTowerConfig = dataclasses.field(default_factory=TextTowerConfig)
    mim: PhaseConfig = dataclasses.field(default_factory=lambda: PhaseConfig(
        steps=10000, images_per_batch=64, warmup_steps=500))
    siglip: PhaseConfig = dataclasses.field(default_factory=lambda: PhaseConfig(
        steps=10000, images_per_batch=64, warmup_steps=500))
    video: PhaseConfig = dataclasses.field(default_factory=lambda: PhaseConfig(
        steps=2000, images_per_batch=16, learning_rate=5e-05, warmup_steps=100, frames_per_clip=8))
    holdout_fraction: float = 0.1  # caption pairs kept out of training, for retrieval evaluation
    num_workers: int = 8  # Ray Train workers (data parallel, ZeRO across them)
    use_gpu: bool = True
    checkpoint_every: int = 500  # steps
    max_failures: int = 3  # Ray Train restarts from the last checkpoint this many times
    weight_decay: float = 0.05
    deepspeed: DeepSpeedSettings = dataclasses.field(default_factory=lambda: DeepSpeedSettings(bf16=True))
    fail_at_step: int = -1  # testing only: the last worker exits once at this global step (-1: never)
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.num_workers < 1 or self.checkpoint_every < 1 or self.max_failures < 0:
            raise ValueError("num_workers and checkpoint_every must be >= 1, max_failures >= 0")
        if self.embed_dim < 1:
            raise ValueError("embed_dim must be >= 1")

    def phases(self) -> list[str]:
        """The enabled phases, in the paper's order."""
        return [name for name in PHASES if getattr(self, name).enabled]


@dataclasses.dataclass
class VitEvalConfig:
    """Zero-shot image-text retrieval on the held-out caption pairs, untrained vs pretrained, and linear
    probes of per-image facts on each phase's frozen tokens (`probe_images` pictures; 0: no probes)."""

    enabled: bool = True
    max_pairs: int = 1000
    probe_images: int = 600
    resources: Resources = dataclasses.field(default_factory=Resources)
