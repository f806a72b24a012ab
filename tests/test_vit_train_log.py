"""The pretraining step's reading of its workers' log: restarts counted from start records, the last
record kept per step after a restart, cut-short lines skipped, a missing log an error; and the
sigmoid loss's positives taken from caption strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.vit.pretrain_model import same_caption, siglip_loss
from components.vit.vit_pretrain import phase_summary, read_train_log


def step(phase: str, global_step: int, loss: float) -> str:
    return json.dumps({"phase": phase, "global_step": global_step, "loss": loss, "images_per_s": 10.0})


def test_restarts_and_duplicate_steps(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"event": "start"}), step("mim", 1, 3.0), step("mim", 2, 2.0), step("mim", 3, 9.0),
             '{"phase": "mim", "glo',  # a worker killed mid-write
             json.dumps({"event": "start"}), step("mim", 3, 1.5), step("mim", 4, 1.0),
             json.dumps({"phase": "mim", "phase_end": True, "global_step": 4, "samples_kept": 64.0})]
    log.write_text("\n".join(lines) + "\n")
    records, restarts = read_train_log(log)
    assert restarts == 1
    steps = [r for r in records if not r.get("phase_end")]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4] and steps[2]["loss"] == 1.5
    summary = phase_summary(records, "mim")
    assert summary["mim_steps"] == 4 and summary["mim_loss_first"] == 3.0 and summary["mim_samples_kept"] == 64.0


def test_missing_log_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="storage every Ray node sees"):
        read_train_log(tmp_path / "absent.jsonl")


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
