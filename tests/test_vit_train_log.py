"""The training runtime's one reader of its workers' log (components/training/runtime.py): restarts
counted from start records, the last record kept per global step after a restart, cut-short and
foreign lines skipped, a missing log an error, a phase's summary; the warmup-cosine schedule; and the
sigmoid loss's positives taken from caption strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.training.runtime import read_log
from components.training.worker import warmup_cosine
from components.vit.pretrain_model import same_caption, siglip_loss
from components.vit.vit_pretrain import phase_summary


def step(part: str, global_step: int, loss: float) -> str:
    return json.dumps({"part": part, "step": global_step, "global_step": global_step, "loss": loss,
                       "images_per_s": 10.0})


def test_restarts_and_duplicate_steps(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"event": "start"}), step("mim", 1, 3.0), step("mim", 2, 2.0), step("mim", 3, 9.0),
             '{"part": "mim", "glo',  # a worker killed mid-write
             "", "[1, 2]", json.dumps({"loss": 1.0}),  # blank, not a record, a record of nothing known
             json.dumps({"event": "start"}), step("mim", 3, 1.5), step("mim", 4, 1.0), step("siglip", 5, 0.5),
             json.dumps({"part": "mim", "part_end": True, "global_step": 4, "samples_kept": 64.0})]
    log.write_text("\n".join(lines) + "\n")
    records = read_log(log)
    assert records.restarts == 1 and len(records.starts) == 2
    assert [r["global_step"] for r in records.steps] == [1, 2, 3, 4, 5] and records.steps[2]["loss"] == 1.5
    assert [r["global_step"] for r in records.part("mim")] == [1, 2, 3, 4]
    summary = phase_summary(records, "mim")
    assert summary["mim_steps"] == 4 and summary["mim_loss_first"] == 3.0 and summary["mim_loss_last"] == 1.0
    assert summary["mim_samples_kept"] == 64.0 and summary["mim_images_per_s_mean"] == 10.0
    assert summary["mim_loss_last10"] == pytest.approx((3.0 + 2.0 + 1.5 + 1.0) / 4)
    assert "siglip_samples_kept" not in phase_summary(records, "siglip")


def test_missing_log_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="storage every Ray node sees"):
        read_log(tmp_path / "absent.jsonl")


def test_warmup_then_cosine_to_the_floor() -> None:
    factor = warmup_cosine(steps=110, warmup_steps=10, floor=0.1)
    assert [round(factor(s), 4) for s in (0, 4, 9)] == [round(1 / 11, 4), round(5 / 11, 4), round(10 / 11, 4)]
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.55)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)


def test_positives_come_from_caption_strings_not_truncated_tokens() -> None:
    captions = ["a red circle " + "x" * 200, "a red circle " + "y" * 200, "a red circle " + "x" * 200]
    positives = same_caption(captions)
    assert positives.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale, bias = torch.log(torch.tensor([10.0])), torch.tensor([-10.0])
    by_hand = 0.0
    logits = scale.exp() * image @ image.T + bias
    for i in range(3):
        for j in range(3):
            label = 1.0 if positives[i, j] else -1.0
            by_hand -= float(torch.nn.functional.logsigmoid(torch.tensor(label) * logits[i, j]))
    assert float(siglip_loss(image, image, positives, scale, bias)) == pytest.approx(by_hand / 3, rel=1e-5)
