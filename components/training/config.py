"""Typed settings of the training runtime that every trained stage shares: how DeepSpeed runs."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class DeepSpeedSettings:
    """ZeRO stage, bf16 and gradient clipping; `components.training.runtime.deepspeed_config` turns them
    into DeepSpeed's config dict."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False
    gradient_clipping: float = 1.0

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.gradient_clipping < 0:
            raise ValueError(f"deepspeed.gradient_clipping must be >= 0, got {self.gradient_clipping}")
