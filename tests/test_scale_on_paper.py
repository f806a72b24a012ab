"""The paper's sizing on the meta device (no memory allocated): Seed-ViT at 532M parameters and an MoE
LLM of about 20B active, from configs/profiles/paper.yaml through the project's own model builders;
and the FLOP / GPU-hour arithmetic behind docs/scale.md. Run with -s to see the counts."""

from __future__ import annotations

import pytest

from components.schema import load_config
from components.vlm.sizing import (
    H100_BF16_PEAK_FLOPS,
    PAPER_STAGES,
    ParameterCounts,
    StagePlan,
    count_parameters,
    gpu_hours,
    stage_table,
    training_flops,
)


def test_paper_sizing_on_the_meta_device() -> None:
    config, _ = load_config("paper")
    counts = count_parameters(config)
    print(f"\npaper sizing (meta device):\n{counts.table()}")
    assert counts.vit == pytest.approx(532.0e6, abs=0.1e6)  # the paper's Seed-ViT
    assert 19e9 <= counts.llm_active <= 21e9  # "an MoE LLM of 20B active parameters"
    assert counts.llm_total > 8 * counts.llm_active  # 8 of 128 experts per token
    assert counts.adapter == 1280 * 2 + 1280 * 4096 + 4096 + 4096 * 4096 + 4096  # LayerNorm, Linear, Linear


def test_tiny_sizing_matches_what_the_readme_says() -> None:
    config, _ = load_config("tiny")
    counts = count_parameters(config)
    print(f"\ntiny sizing (meta device):\n{counts.table()}")
    assert counts.vit == pytest.approx(0.5e6, rel=0.1) and counts.llm_total == pytest.approx(1.0e6, rel=0.1)


def test_flops_follow_the_six_n_rule_per_stage() -> None:
    counts = ParameterCounts(vit=10, adapter=1, llm_total=1000, llm_active=100)
    full = StagePlan("s", tokens=2, visual_share=0.5, vit_trains=True, llm_trains=True, mfu=(0.3, 0.4))
    assert training_flops(counts, full) == 2 * (6 * 100 + 0.5 * (6 * 10 * 4 + 6 * 1))
    adapter_only = StagePlan("s", tokens=2, visual_share=0.5, vit_trains=False, llm_trains=False, mfu=(0.3, 0.4))
    assert training_flops(counts, adapter_only) == 2 * (4 * 100 + 0.5 * (2 * 10 * 4 + 6 * 1))
    assert gpu_hours(0.5 * H100_BF16_PEAK_FLOPS * 3600, mfu=0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mfu"):
        gpu_hours(1.0, mfu=40)


def test_paper_stage_table_orders_stages_by_their_tokens() -> None:
    assert [s.tokens for s in PAPER_STAGES] == [16e9, 3e12, 240e9]
    counts = ParameterCounts(vit=532_000_000, adapter=22_000_000, llm_total=220_000_000_000, llm_active=20_000_000_000)
    rows = {r["stage"]: r for r in stage_table(counts)}
    assert rows["stage1"]["gpu_hours_at_high_mfu"] > rows["stage2"]["gpu_hours_at_high_mfu"] > rows["stage0"]["gpu_hours_at_high_mfu"]
    # stage 1 alone: 3T tokens x ~6 x 20B active ~ 3.6e23 FLOPs ~ 250k H100 hours at 40 % MFU
    assert 2.0e5 < rows["stage1"]["gpu_hours_at_high_mfu"] < 3.5e5
    assert rows["stage1"]["gpu_hours_at_low_mfu"] == pytest.approx(rows["stage1"]["gpu_hours_at_high_mfu"] * 0.4 / 0.3)
