"""What a trained stage shows in MLflow and in the terminal (components/training/runtime.py, worker.py):
the shared `train/*` keys every stage logs, the smoothed loss restarting with each part, and the
progress line with its ETA at a steady rate."""

from __future__ import annotations

import pytest

from components.training.runtime import log_step_metrics, smoothed, step_metric_series
from components.training.worker import ProgressPrinter, format_seconds


def record(part: str, global_step: int, loss: float) -> dict:
    return {"part": part, "step": global_step, "global_step": global_step, "loss": loss, "lr": 1e-3,
            "tokens_per_s": 100.0 * global_step, "flag": True}


def test_every_stage_logs_the_same_keys_with_a_smoothed_loss() -> None:
    records = [record("mim", 1, 4.0), record("mim", 2, 2.0), record("siglip", 3, 10.0), record("siglip", 4, 8.0)]
    series = step_metric_series(records)
    assert [step for _, step in series] == [1, 2, 3, 4]
    first = series[0][0]
    assert set(first) == {"train/loss", "train/lr", "train/tokens_per_s", "train/loss_smoothed"}  # no bools, no steps
    assert series[1][0]["train/tokens_per_s"] == 200.0
    # debiased EMA: the first point is the loss itself, the second (0.9*0.1*4 + 0.1*2) / (1 - 0.81)
    assert first["train/loss_smoothed"] == 4.0
    assert series[1][0]["train/loss_smoothed"] == pytest.approx((0.09 * 4 + 0.1 * 2) / 0.19)
    assert series[2][0]["train/loss_smoothed"] == 10.0  # a new part restarts the average
    logged: list = []
    log_step_metrics(records, lambda metrics, step: logged.append((metrics, step)))
    assert logged == series


def test_smoothing_is_debiased_and_checked() -> None:
    assert smoothed([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # a flat loss stays flat
    values = smoothed([1.0, 5.0] * 50)
    assert 2.5 < values[-1] < 3.5 and max(values[50:]) - min(values[50:]) < 1.0  # the jumps are damped
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        smoothed([1.0], beta=1.0)


def test_progress_line_at_a_steady_rate_with_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 101.0, 102.0, 112.0, 113.0, 114.0])  # start, then one reading per update
    monkeypatch.setattr("components.training.worker.time.perf_counter", lambda: next(clock))
    lines: list[str] = []
    printer = ProgressPrinter("stage1", steps=5, start_step=0, every_s=10.0, write=lines.append)
    for step in range(1, 6):
        printer.update(step, {"loss": 2.0, "lr": 3e-4})
    # step 1 (first), step 3 (10 s after the last line), step 5 (the last); steps 2 and 4 within 10 s
    assert [line.split("  ")[0] for line in lines] == ["[stage1] step 1/5", "[stage1] step 3/5", "[stage1] step 5/5"]
    assert "loss 2.0000 (smoothed 2.0000)" in lines[0] and "lr 3.00e-04" in lines[0]
    assert lines[0].endswith("1.00 s/step  ETA 4s")  # 1 s per step, 4 steps left
    assert lines[1].endswith("4.00 s/step  ETA 8s") and lines[2].endswith("done")


def test_seconds_read_as_minutes_and_hours() -> None:
    assert [format_seconds(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
