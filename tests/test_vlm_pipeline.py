"""The VLM steps end to end through the real entry point, on the shared tiny run: the byte-level BPE and
text-only LLM pretraining, stages 0, 1 and 2 on Ray Train + DeepSpeed, each stage's evaluation as its
own step logged to its own MLflow run, an evaluation setting changed re-evaluating without retraining,
exports that load without the training stack, the skip-stage-0 ablation as an experiment overlay, every
stage surviving a worker killed mid-stage, and the final export registered and served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_runs import REPO, SFT_STEPS, SMALL, VLM_STEPS, PipelineRun, free_port, last_summary, pipeline

pytestmark = pytest.mark.e2e


def run(root: Path, *args: str) -> dict[str, dict]:
    pipeline(root, "--until", "vlm_eval_stage2", *args, timeout=1200)
    return last_summary(root)


def test_vlm_stages_eval_export_ablation_and_resume(tiny_run: PipelineRun) -> None:
    from components.vlm.model import load_vlm

    root, steps = tiny_run.root, tiny_run.steps
    assert [steps[name]["status"] for name in VLM_STEPS] == ["ran"] * len(VLM_STEPS)
    for name, count in (("llm_pretrain", 4), ("vlm_stage0", 2), ("vlm_stage1", 3), ("vlm_stage2", 2)):
        assert steps[name]["metrics"]["steps"] == count and steps[name]["metrics"]["restarts"] == 0
    # the suite ran after every stage, as its own step; only the stage that starts from a fresh adapter scores
    # its start too
    for name in ("vlm_eval_stage0", "vlm_eval_stage1", "vlm_eval_stage2"):
        metrics = steps[name]["metrics"]
        assert {"eval/counting_accuracy", "eval/grounding_iou50", "eval/ocr_exact", "eval/caption_f1",
                "eval/image_use_gap", "eval/n_counting"} <= set(metrics), name
        assert metrics["eval/n_counting"] >= 1
        # every score beside its shuffled-image control, the gap per task, the probes of the export's tokens
        # (a kind whose held-out items all come from one sample has no other image to swap in: here counting)
        assert {"eval_shuffled/caption_f1", "eval_gap/caption_f1", "eval_shuffled/caption_object_colour_recall",
                "eval/image_use_gap_caption", "eval/probe_vit_colour_present_max",
                "eval/probe_adapter_cell_colour"} <= set(metrics), name
        assert metrics["eval_shuffled/n_caption"] == metrics["eval/n_caption"] >= 2
        assert abs(metrics["eval_gap/caption_f1"] - (metrics["eval/caption_f1"] - metrics["eval_shuffled/caption_f1"])) < 1e-9
    vit_probes = steps["vit_eval"]["metrics"]
    assert {"probe_pixels_colour_present_mean", "probe_initial_colour_present_mean",
            "probe_video_cell_object", "probe_siglip_count_max"} <= set(vit_probes)
    assert "eval_untrained/caption_f1" in steps["vlm_eval_stage0"]["metrics"]
    assert not any(k.startswith("eval_untrained/") for k in steps["vlm_eval_stage1"]["metrics"])
    assert not any(k.startswith("eval") for k in steps["vlm_stage1"]["metrics"])  # training steps only train
    assert steps["vlm_stage2"]["metrics"]["samples_kept"] > 0

    # stage 0 trains only the adapter; stage 1 everything
    log0 = (Path(steps["vlm_stage0"]["output_dir"]) / "vlm" / "train_log.jsonl").read_text().splitlines()
    log1 = (Path(steps["vlm_stage1"]["output_dir"]) / "vlm" / "train_log.jsonl").read_text().splitlines()
    trainable0, trainable1 = json.loads(log0[0])["trainable"], json.loads(log1[0])["trainable"]
    assert trainable0["vit"] == trainable0["llm"] == 0 < trainable0["adapter"]
    assert min(trainable1.values()) > 0

    # the export loads with no Ray or DeepSpeed, holds no pickles, and the tokenizer has the special tokens
    export = Path(steps["vlm_stage2"]["output_dir"]) / "vlm" / "model"
    model, tokenizer, saved = load_vlm(export)
    assert saved["stage"] == "stage2" and tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.image_pad_id
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pt"))
    assert (export / "llm" / "config.json").is_file() and list((export / "llm").glob("*.safetensors"))
    examples = (Path(steps["vlm_eval_stage1"]["output_dir"]) / "eval" / "stage1.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in examples]
    assert rows and all({"prediction", "reference", "kind"} <= set(row) for row in rows)
    assert rows == sorted(rows, key=lambda row: (row["key"], row["kind"], row["turn"]))  # the same file every run
    # every item of a kind the control could swap images for carries its shuffled answer too
    swapped = {key.removeprefix("eval_shuffled/n_") for key in steps["vlm_eval_stage1"]["metrics"]
               if key.startswith("eval_shuffled/n_")}
    assert "caption" in swapped and all("prediction_shuffled" in row for row in rows if row["kind"] in swapped)

    # an evaluation setting changed: every evaluation reruns, nothing trains again
    changed = run(root, "--set", "train.vlm.eval.max_new_tokens=5")
    assert {name: changed[name]["status"] for name in VLM_STEPS} == {
        name: "ran" if name.startswith("vlm_eval_") else "cached" for name in VLM_STEPS}
    assert changed["vlm_eval_stage1"]["cache_key"] != steps["vlm_eval_stage1"]["cache_key"]

    # ablation: no stage 0, stage 1 starts from a fresh adapter (and its evaluation scores that start); each
    # stage loses a worker once mid-stage and resumes from its checkpoint
    ablation = run(root, "--experiment", "skip_stage0", "--set", "train.vlm.fail_at_step=1")
    assert ablation["vlm_stage0"]["status"] == ablation["vlm_eval_stage0"]["status"] == "skipped"
    assert ablation["llm_pretrain"]["status"] == "cached" and ablation["vit_pretrain"]["status"] == "cached"
    assert {ablation[name]["status"] for name in ("vlm_stage1", "vlm_eval_stage1", "vlm_stage2")} == {"ran"}
    assert ablation["vlm_stage1"]["cache_key"] != steps["vlm_stage1"]["cache_key"]
    for name, count in (("vlm_stage1", 3), ("vlm_stage2", 2)):
        assert ablation[name]["metrics"]["restarts"] == 1 and ablation[name]["metrics"]["steps"] == count
    assert "eval_untrained/counting_accuracy" in ablation["vlm_eval_stage1"]["metrics"]

    check_mlflow(root)
    check_serving(tiny_run)


def test_sft_data_rounds_rejection_sampling_and_both_modes(tiny_run: PipelineRun) -> None:
    """The SFT steps of the shared run: conversations in both modes from the training split (counts in = kept +
    dropped), two SFT rounds from stage 2's export on the training runtime, rejection sampling judged by the
    verifiers, and the evaluation in both modes with its controls; the export records its answer modes."""
    from components.common.webdataset_tar import iter_samples
    from components.vlm.model import load_vlm
    from components.vlm.modes import MODES
    from components.vlm.verifiers import split_thinking

    steps = tiny_run.steps
    assert [steps[name]["status"] for name in SFT_STEPS] == ["ran"] * len(SFT_STEPS)
    data = steps["sft_data"]["metrics"]
    assert data["samples_thinking"] > 0 and data["samples_kept"] > data["samples_thinking"]
    for task in ("caption", "counting", "grounding", "ocr"):
        assert data[f"{task}/read"] == data[f"{task}/kept"] + data[f"{task}/dropped"] and data[f"{task}/kept"] > 0
    assert data["counting/thinking"] > 0 and data["grounding/thinking"] > 0 and data["mean_thinking_words"] > 5
    shards = Path(steps["sft_data"]["output_dir"]) / "sft"
    _, members = next(iter_samples(sorted((shards / "counting").glob("*.tar"))[0]))
    first = json.loads(members["json"])
    assert first["conversations"][0]["from"] == "system" and first["conversations"][0]["value"] in MODES.values()
    for name in ("vlm_sft", "vlm_sft_rs"):
        assert steps[name]["metrics"]["steps"] == 2 and steps[name]["metrics"]["restarts"] == 0
    sampled = steps["rejection_sampling"]["metrics"]
    assert sampled["all/prompts"] >= 2 and sampled["all/samples"] == 2 * sampled["all/prompts"]
    assert 0.0 <= sampled["all/acceptance_rate"] <= 1.0 and "counting/format_failures" in sampled
    rows = (Path(steps["rejection_sampling"]["output_dir"]) / "samples" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == sampled["all/samples"] and {"reward", "correct", "response"} <= set(json.loads(rows[0]))
    evaluation = steps["vlm_eval_sft"]["metrics"]
    for mode in ("direct", "thinking"):
        assert {f"eval_{mode}/caption_f1", f"eval_{mode}_shuffled/caption_f1", f"eval_{mode}_gap/caption_f1",
                f"eval_{mode}/counting_accuracy", f"eval_{mode}/answer_words"} <= set(evaluation), mode
    assert "eval_thinking/format_ok" in evaluation and "eval_thinking/thinking_words" in evaluation
    assert "eval_direct/image_use_gap" in evaluation and "eval_thinking/image_use_gap" not in evaluation
    assert not any("probe_" in key for key in evaluation)  # eval.post_training_probes is off in tiny
    examples = (Path(steps["vlm_eval_sft"]["output_dir"]) / "eval" / "thinking.jsonl").read_text().splitlines()
    assert examples and all(split_thinking(json.loads(e)["prediction"]) is not None for e in examples)
    _, _, saved = load_vlm(Path(steps["vlm_sft_rs"]["output_dir"]) / "vlm" / "model")
    assert saved["stage"] == "sft_rs" and saved["answer_modes"] == MODES


def check_serving(tiny_run: PipelineRun) -> None:
    """The shared run's last step registered the RL export (the last training step that ran) and served it (it ended with the process,
    serve.keep_alive=false); the registered version is then served on its own and answers the openai client."""
    import signal
    import threading
    import urllib.request

    import openai
    from mlflow.tracking import MlflowClient

    root = tiny_run.root
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    served = tiny_run.steps["serve"]
    assert served["status"] == "ran" and served["metrics"]["smoke_completion_tokens"] >= 1
    endpoint = json.loads((Path(served["output_dir"]) / "endpoint" / "endpoint.json").read_text())
    assert endpoint["url"].startswith("http://127.0.0.1:") and "vlm_rl" in endpoint["checkpoint"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias("seedvl", "latest-pipeline")
    assert endpoint["registered"] == f"models:/seedvl/{version.version}"
    assert client.get_run(version.run_id).data.tags["mlflow.runName"] == "serve"
    assert client.get_run(version.tags["trained_by_run_id"]).data.tags["step"] == "vlm_rl"  # the scores' links
    assert client.get_run(version.tags["eval_run_id"]).data.tags["step"] == "vlm_eval_rl"
    assert client.get_run(version.tags["pipeline_run_id"]).data.tags["kind"] == "pipeline"
    assert "| counting_accuracy |" in version.description and "checkpoint" not in version.tags
    # the tiny RL rolled out in direct mode and is evaluated in that mode only (vlm_eval_rl)
    assert "Answering in direct mode" in version.description and "Answering in thinking mode" not in version.description

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "components.serve.deploy", "--model", "models:/seedvl@latest-pipeline",
                               *SMALL, "--set", f"serve.port={port}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    printed: list[str] = []
    up = threading.Event()

    def drain() -> None:  # read everything it prints, so a full pipe never blocks it
        for line in server.stdout or []:
            printed.append(line)
            if "The endpoint is up" in line:  # deployed, and the Ctrl-C handler is in place
                up.set()
        up.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert up.wait(timeout=300) and server.poll() is None, "".join(printed)[-3000:]
        assert any("serving models:/seedvl/" in line for line in printed)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == "seedvl"
        chat = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        answer = chat.chat.completions.create(model="seedvl", messages=[{"role": "user", "content": "Describe the image."}],
                                              max_tokens=8, temperature=0)
        assert answer.usage.completion_tokens >= 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            assert server.wait(timeout=120) == 0
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)


def check_mlflow(root: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["seed-vl"], output_format="list")
    def trained(name: str) -> list:
        return [r for r in runs if r.data.tags.get("mlflow.runName") == name and r.data.tags["cache_hit"] == "false"]

    stage1 = trained("vlm_stage1")
    assert len(stage1) == 2  # the shared run and the ablation; the evaluation change retrained nothing
    for run in stage1:
        assert {"loss_last", "tokens_per_s_mean"} <= set(run.data.metrics)
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        assert [point.step for point in history] == [1, 2, 3]
        assert run.data.params["stage.steps"] == "3" and "stage2.steps" not in run.data.params
    evaluations = trained("vlm_eval_stage1")
    assert len(evaluations) == 3  # the shared run, the evaluation change, the ablation
    for run in evaluations:
        assert {"eval/counting_accuracy", "eval/image_use_gap"} <= set(run.data.metrics)
