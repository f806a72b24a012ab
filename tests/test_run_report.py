"""What a user sees in MLflow after a pipeline run (pipelines/runner.py, components/common/report.py):
the parent run's report (the stage-by-stage evaluation table with its untrained and shuffled-image
columns, four PNG charts), and a cached rerun whose child runs are marked as cache hits, link the run
that produced them and carry its metrics and training curves. Toy steps, a real MLflow store; no Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from components.common.contract import StageContext, StageResult, component
from components.common.report import eval_table, funnel, gap, main, phase_table, write_report
from components.schema import load_config
from components.training.runtime import log_step_metrics, read_log


@component(name="toy_data", version="1", config="data.basic_filters", outputs=("samples",))
def toy_data(ctx: StageContext) -> StageResult:
    ctx.outputs["samples"].mkdir()
    (ctx.outputs["samples"] / "rows.json").write_text("[1, 2, 3]")
    return StageResult(metrics={"rows_in": 10, "rows_kept": 7, "dropped.image_too_small": 2,
                                "dropped.caption_missing": 1})


@component(name="toy_train", version="1", config="data.basic_filters", inputs=("samples",), outputs=("model",))
def toy_train(ctx: StageContext) -> StageResult:
    out = ctx.outputs["model"]
    out.mkdir()
    lines = [{"event": "start"}] + [{"part": "stage1", "loss": 4.0 / step, "lr": 1e-3, "tokens_per_s": 50.0,
                                     "step": step, "global_step": step} for step in range(1, 6)]
    (out / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    log_step_metrics(read_log(out / "train_log.jsonl").steps, ctx.log_metrics)
    return StageResult(metrics={"loss_last": 0.8}, artifacts=["model/train_log.jsonl"])


@component(name="toy_eval_stage1", version="1", config="data.basic_filters", inputs=("model",), outputs=("eval",))
def toy_eval(ctx: StageContext) -> StageResult:
    ctx.outputs["eval"].mkdir()
    (ctx.outputs["eval"] / "scores.json").write_text("{}")
    return StageResult(metrics={"eval/caption_f1": 0.6, "eval_untrained/caption_f1": 0.1,
                                "eval_shuffled/caption_f1": 0.25, "eval/n_caption": 16.0})


def toy_steps() -> list:
    from pipelines.runner import Step

    return [Step(toy_data), Step(toy_train, inputs={"samples": ("toy_data", "samples")}),
            Step(toy_eval, inputs={"model": ("toy_train", "model")})]


def run_toy(root: Path, monkeypatch: pytest.MonkeyPatch):
    from pipelines.runner import PipelineRunner, Selection

    monkeypatch.setattr("pipelines.runner.ensure_ray", lambda *args: None)  # the toy steps need no Ray
    config, layered = load_config("tiny", [], [f"run.root={root}"])
    runner = PipelineRunner(toy_steps(), config, layered, Selection())
    return runner, runner.run(["test"])


def test_cached_rerun_links_its_producer_and_reports_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    root = tmp_path / "runs"
    with caplog.at_level("INFO", logger="pipeline"):
        first_runner, first = run_toy(root, monkeypatch)
        second_runner, second = run_toy(root, monkeypatch)
    assert [o.status for o in first] == ["ran"] * 3 and [o.status for o in second] == ["cached"] * 3
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline"]  # the terminal: start, verdict, time
    assert lines[0] == f"[1/3] toy_data: running (not cached: key {first[0].cache_key[:12]})"
    assert re.fullmatch(r"\[1/3\] toy_data: ran in \d+\.\ds -> .*/cache/toy_data/\w+", lines[1])
    from pipelines.runner import PipelineRunner, Selection

    config, layered = load_config("tiny", [], [f"run.root={root}"])
    assert PipelineRunner(toy_steps(), config, layered, Selection(until="toy_train"))._steps_to_walk() == 2
    assert PipelineRunner(toy_steps(), config, layered, Selection(only=("toy_data",)))._steps_to_walk() == 1
    producer = f"produced by MLflow run {first[2].run_id}"
    assert f"[3/3] toy_eval_stage1: cached (key {first[2].cache_key[:12]}, {producer})" in lines
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for ran, cached in zip(first, second):
        run = client.get_run(cached.run_id)
        assert run.data.tags["mlflow.runName"] == f"{ran.name} (cached)" and run.data.tags["step"] == ran.name
        assert run.data.tags["cache_hit"] == "true" and run.data.tags["produced_by_run_id"] == ran.run_id
        assert client.get_run(ran.run_id).data.tags["mlflow.runName"] == ran.name
        assert "produced_by_run_id" not in client.get_run(ran.run_id).data.tags
        assert run.data.metrics == {k: v for k, v in client.get_run(ran.run_id).data.metrics.items()
                                    if not k.startswith("train/")} | {
            k: v for k, v in run.data.metrics.items() if k.startswith("train/")}
    # the training curves: logged while training, copied from the training log on the cache hit
    trained, copied = first[1].run_id, second[1].run_id
    for key in ("train/loss", "train/loss_smoothed", "train/lr", "train/tokens_per_s"):
        original = [(m.step, m.value) for m in client.get_metric_history(trained, key)]
        assert len(original) == 5 and [(m.step, m.value) for m in client.get_metric_history(copied, key)] == original
    # the parent runs: the report as artifacts, the scores as metrics, the path known to the caller
    for runner in (first_runner, second_runner):
        parent = json.loads((runner.record_dir / "summary.json").read_text())["mlflow_run_id"]
        artifacts = {a.path for a in client.list_artifacts(parent, "report")}
        assert artifacts == {f"report/{n}" for n in ("report.html", "eval_scores.png", "training_loss.png",
                                                       "step_times.png", "data_funnel.png")}
        assert client.get_run(parent).data.metrics["toy_eval_stage1.eval_shuffled/caption_f1"] == 0.25
        assert runner.report_path == runner.record_dir / "report" / "report.html"
    page = second_runner.report_path.read_text()
    assert re.search(r"<th>caption_f1</th><td>0\.100</td><td>0\.600</td><td>0\.250</td><td>0\.350</td>", page)
    assert "gap vs shuffled" in page and page.count("data:image/png;base64,") == 4
    assert "cached: produced by run " + first[0].run_id in page


def test_report_reads_tables_generically(tmp_path: Path) -> None:
    steps = [{"name": "ingest", "status": "ran", "duration_s": 1.0, "metrics": {
                  "rows_in": 10, "rows_kept": 8, "dropped.image_corrupt": 2, "dropped.caption_missing": 0}},
             {"name": "write_shards", "status": "cached", "duration_s": 0.0,
              "metrics": {"caption.written": 5, "ocr.written": 3, "duration_s": 2.0}},
             {"name": "vit_eval", "status": "ran", "duration_s": 1.0, "metrics": {
                  "siglip_i2t_r1": 0.5, "siglip_t2i_r1": 0.4, "chance_i2t_r1": 0.1, "chance_t2i_r1": 0.1, "pairs": 9}},
             {"name": "vlm_eval_stage0", "status": "ran", "duration_s": 1.0,
              "metrics": {"eval/ocr_exact": 0.5, "eval/n_ocr": 4, "duration_s": 1.0}}]
    assert funnel(steps) == [("ingest", {"kept": 8.0, "dropped: image_corrupt": 2.0}),
                             ("write_shards", {"caption written": 5.0, "ocr written": 3.0})]
    names, metrics, table = eval_table(steps)
    assert names == ["vlm_eval_stage0"] and metrics == ["ocr_exact", "n_ocr"]  # scores first, counts last
    assert table["vlm_eval_stage0"] == {"eval": {"ocr_exact": 0.5, "n_ocr": 4.0}}
    rows, columns, _ = phase_table(steps[2]["metrics"])
    assert rows == ["siglip", "chance"] and columns == ["i2t_r1", "t2i_r1"]
    page = write_report({"run": "x"}, steps, tmp_path / "report").read_text()
    assert "gap vs shuffled" not in page and "<th>siglip</th><td>0.500</td><td>0.400</td>" in page
    assert "no trained step" not in page and sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "data_funnel.png", "eval_scores.png", "report.html", "step_times.png", "training_loss.png"]
    logged = {"eval": {"ocr_exact": 0.5, "n_ocr": 4.0}, "eval_shuffled": {"ocr_exact": 0.2, "n_ocr": 4.0},
              "eval_gap": {"ocr_exact": 0.25}}  # the evaluation's own gap wins over the difference
    assert gap(logged, "ocr_exact") == 0.25 and gap(logged, "n_ocr") is None
    assert gap({"eval": {"x": 0.5}, "eval_shuffled": {"x": 0.2}}, "x") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="needs a name and a metrics mapping"):
        write_report({}, [{"status": "ran"}], tmp_path / "bad")


def test_report_command_rebuilds_from_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"mlflow_run_id": "abc", "status": "FINISHED", "steps": [
        {"name": "ingest", "status": "ran", "duration_s": 1.0, "metrics": {"rows_in": 3, "rows_kept": 3}}]}))
    assert main([str(summary)]) == 0 and (tmp_path / "report" / "report.html").is_file()
    (tmp_path / "bad.json").write_text("[]")
    assert main([str(tmp_path / "bad.json")]) == 2 and "not a pipeline summary" in capsys.readouterr().err


def test_registered_version_links_its_training_run_and_scores(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from components.common.cache import Manifest
    from components.serve.registry import lineage, register_checkpoint

    def entry(step: str, key: str, run_id: str, metrics: dict, inputs: dict) -> Path:
        folder = tmp_path / "cache" / step / key
        folder.mkdir(parents=True)
        (folder / "_MANIFEST.json").write_text(Manifest(step, "1", key, {"inputs": inputs}, {}, {}, metrics, 0.0, 0.0,
                                                         run_id=run_id).to_json())
        return folder

    trained = entry("vlm_stage2", "k2", "trainrun", {"loss_last": 1.0}, {})
    evaluated = entry("vlm_eval_stage2", "e2", "evalrun", {"eval/caption_f1": 0.6, "eval_shuffled/caption_f1": 0.2,
                                                           "eval_gap/caption_f1": 0.4, "eval/n_caption": 16.0},
                      {"vlm": "k2"})
    other = entry("vlm_eval_stage1", "e1", "otherrun", {"eval/caption_f1": 0.9}, {"vlm": "k1"})
    tags, description = lineage(trained, evaluated, "pipelinerun")
    assert tags == {"stage": "vlm_stage2", "checkpoint_key": "k2", "trained_by_run_id": "trainrun",
                    "pipeline_run_id": "pipelinerun", "eval_step": "vlm_eval_stage2", "eval_run_id": "evalrun"}
    assert "MLflow run `trainrun`" in description and "pipeline run `pipelinerun`" in description
    assert "| metric | trained | shuffled images | gap vs shuffled |" in description
    assert "| caption_f1 | 0.600 | 0.200 | 0.400 |" in description and "n_caption" not in description
    assert not any(str(tmp_path) in value for value in tags.values())  # no absolute paths
    unlinked_tags, unlinked = lineage(trained, other)  # an evaluation of another checkpoint is not shown as its
    assert "eval_run_id" not in unlinked_tags and "No evaluation of this checkpoint" in unlinked
    assert "0.900" not in unlinked

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("seed-vl", artifact_location=str(tmp_path / "mlartifacts"))
    run_id = client.create_run(experiment, run_name="serve").info.run_id
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    version, new = register_checkpoint(uri, run_id, export, "seedvl", tags, description)
    found = client.get_model_version("seedvl", version)
    assert new and found.description == description and found.tags["trained_by_run_id"] == "trainrun"
    relinked = register_checkpoint(uri, run_id, export, "seedvl", tags | {"pipeline_run_id": "next"}, "again")
    assert relinked == (version, False)
    again = client.get_model_version("seedvl", version)
    assert again.description == "again" and again.tags["pipeline_run_id"] == "next"  # reuse brings the links up to date


def test_a_moved_run_root_keeps_its_artifacts(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              capsys: pytest.CaptureFixture) -> None:
    import shutil

    from mlflow.tracking import MlflowClient

    from components.common.tracking import MlflowTracker, main as tracking_main, relocate_moved_artifacts

    old, new = tmp_path / "old" / "runs", tmp_path / "new" / "runs"
    old.mkdir(parents=True)
    tracker = MlflowTracker(f"sqlite:///{old / 'mlflow.db'}", "seed-vl", (old / "mlartifacts").as_uri())
    run_id = tracker.start("pipeline", {})
    (tmp_path / "report.html").write_text("<p>hi</p>")
    tracker.log_artifact(run_id, tmp_path / "report.html", "report")
    tracker.end(run_id)
    shutil.move(old, new)
    client = MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    assert client.list_artifacts(run_id, "report") == []  # what a user saw: silently empty
    with caplog.at_level("WARNING"):
        MlflowTracker(f"sqlite:///{new / 'mlflow.db'}", "seed-vl", (new / "mlartifacts").as_uri())
    assert "does not exist" in caplog.text and "components.common.tracking relocate" in caplog.text
    assert tracking_main(["relocate", str(new)]) == 0 and "-> " + str(new / "mlartifacts") in capsys.readouterr().out
    assert [a.path for a in MlflowClient(f"sqlite:///{new / 'mlflow.db'}").list_artifacts(run_id, "report")] == [
        "report/report.html"]
    assert relocate_moved_artifacts(new) == {}  # nothing left to move
    assert tracking_main(["relocate", str(tmp_path)]) == 2
