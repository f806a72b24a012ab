"""The RL steps end to end through the real entry point, on the shared tiny run: the reward model trained on
its pairs with a held-out accuracy and an export holding its head and score statistics, the RL step's
per-step `rl/` metrics in its MLflow run, its export loading without the training stack (answer modes
recorded for serving), the RL export's evaluation in both modes; and the RL step surviving its actor
killed mid-run, ending within tolerance of the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline_runs import (DATA_STEPS, RL_STEPS, SFT_STEPS, VLM_STEPS, PipelineRun, copy_cached_steps, last_summary,
                           pipeline)

pytestmark = pytest.mark.e2e
PER_STEP = ("reward/general", "reward/verifiable", "verifier/pass_rate", "rm/score", "kl/general", "kl/verifiable",
            "response_length", "value_loss", "truncated", "rollout_tokens_per_s")
POLICY_ONLY = ("entropy", "clip_fraction_low", "clip_fraction_high", "policy_loss")


def test_reward_model_rl_and_its_evaluation_ran_and_logged(tiny_run: PipelineRun) -> None:
    import mlflow

    from components.vlm.model import load_vlm

    steps = tiny_run.steps
    assert [steps[name]["status"] for name in RL_STEPS] == ["ran"] * len(RL_STEPS)
    rm = steps["reward_model"]["metrics"]
    assert rm["train_pairs"] >= 1 and 0.0 <= rm["heldout_pair_accuracy"] <= 1.0 and rm["score_std"] > 0
    rm_export = Path(steps["reward_model"]["output_dir"]) / "reward_model" / "model"
    meta = json.loads((rm_export / "value_head.json").read_text())
    assert {"score_mean", "score_std"} <= set(meta) and (rm_export / "value_head.safetensors").is_file()

    rl = steps["vlm_rl"]["metrics"]
    assert rl["steps"] == 3 and rl["policy_steps"] == 2 and rl["restarts"] == 0  # 1 value-pretraining step + 2
    assert rl["prompts_general"] >= 1 and rl["prompts_verifiable"] >= 1
    export = Path(steps["vlm_rl"]["output_dir"]) / "vlm" / "model"
    model, tokenizer, saved = load_vlm(export)
    assert saved["stage"] == "rl" and set(saved["answer_modes"]) == {"thinking", "direct"}
    assert not list(export.rglob("*.pt")) and not (export.parent / "checkpoints").exists()
    evaluation = steps["vlm_eval_rl"]["metrics"]
    assert "eval_direct/counting_accuracy" in evaluation
    # the shared run's counting items come from one held-out sample (no other image to swap in): captions have it
    assert "eval_direct_shuffled/caption_f1" in evaluation
    # RL rolled out in direct mode (the tiny profile's): it is evaluated in that mode only, without the probes
    assert not any(k.startswith("eval_thinking") or "probe_" in k for k in evaluation)

    mlflow.set_tracking_uri(f"sqlite:///{tiny_run.root / 'mlflow.db'}")
    runs = [r for r in mlflow.search_runs(experiment_names=["seed-vl"], output_format="list")
            if r.data.tags.get("mlflow.runName") == "vlm_rl"]
    assert runs
    client = mlflow.MlflowClient()
    for metric in PER_STEP:
        assert [p.step for p in client.get_metric_history(runs[0].info.run_id, f"rl/{metric}")] == [0, 1, 2], metric
    for metric in POLICY_ONLY:  # the policy moves after value pretraining only
        assert [p.step for p in client.get_metric_history(runs[0].info.run_id, f"rl/{metric}")] == [1, 2], metric


def test_rl_resumes_after_its_actor_is_killed(tiny_run: PipelineRun, tmp_path: Path) -> None:
    """Same config as the shared run (fail_at_step and the checkpoint cadence are not in the cache key, so the
    fresh root recomputes only vlm_rl): the actor dies once at the last step, the groups restart from the
    checkpoint of the step before, and the run ends where the uninterrupted one did."""
    root = tmp_path / "runs"
    copy_cached_steps(tiny_run.root, root, (*DATA_STEPS, "vit_pretrain", "vit_eval", *VLM_STEPS, *SFT_STEPS,
                                            "reward_model"))
    pipeline(root, "--until", "vlm_rl", "--set", "train.vlm.rl.fail_at_step=2", timeout=1200)
    steps = last_summary(root)
    assert steps["reward_model"]["status"] == "cached" and steps["vlm_rl"]["status"] == "ran"
    assert steps["vlm_rl"]["cache_key"] == tiny_run.steps["vlm_rl"]["cache_key"]
    resumed, straight = steps["vlm_rl"]["metrics"], tiny_run.steps["vlm_rl"]["metrics"]
    assert resumed["restarts"] == 1 and resumed["steps"] == straight["steps"]
    for key in ("reward_all_first", "reward_all_last", "mean_response_length", "mean_value_loss"):
        if key in straight:
            assert resumed[key] == pytest.approx(straight[key], abs=0.05), key
