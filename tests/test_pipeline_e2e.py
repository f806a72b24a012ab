"""End to end on the tiny profile: the real entry point, killed and rerun, cached reruns, one knob
changed, --only, MLflow's record of it all, and `ray job submit` against a local head."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline_runs import (DATA_STEPS, REPO, RL_STEPS, SFT_STEPS, SMALL, PipelineRun, copy_cached_steps, free_port,
                           last_summary, pipeline, stop_process_group)

pytestmark = pytest.mark.e2e
ALL_STEPS = (*DATA_STEPS, "vit_pretrain", "vit_eval")
BEFORE_SHARDS = DATA_STEPS[:DATA_STEPS.index("write_shards")]
POST_TRAINING = (*SFT_STEPS, *RL_STEPS)


def expect(ran: set[str], upto: str = "vit_eval") -> dict[str, str]:
    steps = ALL_STEPS[: ALL_STEPS.index(upto) + 1]
    return {name: "ran" if name in ran else "cached" for name in steps}


def run_pipeline(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The pipeline through vit_eval (unless `args` select otherwise): the data and ViT steps."""
    until = [] if {"--until", "--only"} & set(args) else ["--until", "vit_eval"]
    return pipeline(root, *until, *args, timeout=900, check=check)


def statuses(root: Path) -> dict[str, str]:
    """The steps that ran or were cached (steps off in this config, e.g. video_captions, left out)."""
    return {name: step["status"] for name, step in last_summary(root).items() if step["status"] != "skipped"}


def staging_leftovers(root: Path) -> list[Path]:
    return sorted(p for p in (root / "cache").rglob(".staging-*"))


def kill_when_staging(root: Path, stage: str, timeout: float = 900) -> None:
    """Start the pipeline and SIGKILL its whole process group once `stage` has begun writing."""
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    process = subprocess.Popen([sys.executable, "pipelines/full.py", *SMALL], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    seen = False
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if list((root / "cache" / stage).glob(".staging-*")):
                seen = True
                time.sleep(3.0)  # let it write something
                break
            time.sleep(0.2)
        assert seen, f"{stage} did not start within {timeout:.0f} s"
        assert process.poll() is None, "the pipeline ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def test_killed_rerun_cached_and_knob_change(tiny_run: PipelineRun, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    copy_cached_steps(tiny_run.root, root, BEFORE_SHARDS)  # the shared run's first steps, same keys: cached
    kill_when_staging(root, "write_shards")
    assert staging_leftovers(root), "the killed run should have left its staging folder"
    assert not list((root / "cache" / "write_shards").glob("[!.]*")), "a killed stage must publish nothing"

    run_pipeline(root)  # rerun after the kill
    assert statuses(root) == expect({"write_shards", "vit_pretrain", "vit_eval"})
    assert staging_leftovers(root) == []
    first = last_summary(root)
    shards = Path(first["write_shards"]["output_dir"]) / "shards"
    shared = Path(tiny_run.steps["write_shards"]["output_dir"]) / "shards"
    assert first["write_shards"]["cache_key"] == tiny_run.steps["write_shards"]["cache_key"]
    assert sorted(p.read_bytes() for p in shards.rglob("*.tar")) == sorted(p.read_bytes() for p in shared.rglob("*.tar"))
    stats = json.loads((Path(first["write_shards"]["output_dir"]) / "shards" / "stats.json").read_text())
    assert stats["tasks"]["caption"]["in"] == 240 and stats["in"] == stats["kept"] + sum(stats["dropped"].values())
    assert set(stats["tasks"]) == {"caption", "ocr", "grounding", "counting", "video"}
    assert_shards_complete(Path(first["write_shards"]["output_dir"]) / "shards", stats)

    started = time.monotonic()
    cached = run_pipeline(root)
    cached_seconds = time.monotonic() - started
    assert set(statuses(root).values()) == {"cached"}
    assert "starting a local Ray" not in cached.stderr  # nothing to compute, so no Ray at all
    print(f"fully cached rerun: {cached_seconds:.1f}s")

    run_pipeline(root, "--set", "data.basic_filters.min_short_side=150")
    assert statuses(root) == expect({"basic_filters", "clip_filter", "dedup", "rebalance", "write_shards",
                                     "vit_pretrain", "vit_eval"})
    changed = last_summary(root)
    assert changed["ingest"]["cache_key"] == first["ingest"]["cache_key"]
    assert changed["write_shards"]["cache_key"] != first["write_shards"]["cache_key"]

    run_pipeline(root, "--only", "basic_filters", "--set", "data.basic_filters.min_short_side=120")
    assert statuses(root) == expect({"basic_filters"}, upto="basic_filters")

    refused = run_pipeline(root, "--only", "write_shards", "--set", "data.basic_filters.min_short_side=110",
                           check=False)
    assert refused.returncode == 2 and "upstream step 'basic_filters' is not cached" in refused.stderr

    run_pipeline(root, "--force", "ingest")
    assert statuses(root) == expect({"ingest"})  # same inputs, same keys: downstream stays valid

    check_mlflow(root)


def assert_shards_complete(folder: Path, stats: dict) -> None:
    """After a kill and rerun: exactly the shards the stats list, each sample once, none missing."""
    import tarfile

    from components.data.write_shards import list_shards

    shards = list_shards(folder)
    assert sorted(str(p.relative_to(folder)) for p in shards) == sorted(stats["per_shard"])
    keys = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys += [name[: -len(".json")] for name in tar.getnames() if name.endswith(".json")]
    assert len(keys) == len(set(keys)) == stats["written"]
    assert not list(folder.rglob(".*.tmp"))


def check_mlflow(root: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["seed-vl"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 7  # the killed run, then 6 more (the refused --only run included)
    finished = [p for p in parents if p.info.status == "FINISHED"]
    assert len(finished) == 5
    assert [p.info.status for p in parents].count("KILLED") == 1  # closed by the next run
    latest = max(finished, key=lambda r: r.info.start_time)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest.info.run_id]
    by_name = {c.data.tags["step"]: c for c in children}  # a cached step's run is named "<step> (cached)"
    assert set(by_name) == set(ALL_STEPS)
    assert {"mismatch_precision", "mismatch_recall", "threshold"} <= set(by_name["clip_filter"].data.metrics)
    assert {"duplicate_recall", "distinct_removed_rate"} <= set(by_name["dedup"].data.metrics)
    assert {"mim_loss_last", "siglip_loss_last", "video_loss_last", "siglip_tokens_per_s_mean"} <= set(
        by_name["vit_pretrain"].data.metrics)
    assert {"initial_i2t_r1", "siglip_i2t_r5", "chance_i2t_r1"} <= set(by_name["vit_eval"].data.metrics)
    trained = [r for r in runs if r.data.tags.get("mlflow.runName") == "vit_pretrain"
               and r.data.tags.get("cache_hit") == "false"]  # the latest run took it from the cache
    assert len(trained) == 2  # the rerun after the kill, and the knob change
    history = mlflow.MlflowClient().get_metric_history(trained[0].info.run_id, "train/loss")
    steps = int(trained[0].data.metrics["steps"])  # the phases follow each other in global steps
    assert [point.step for point in history] == list(range(1, steps + 1))  # one point per step, at the global step
    smoothed = mlflow.MlflowClient().get_metric_history(trained[0].info.run_id, "train/loss_smoothed")
    assert len(smoothed) == steps
    filters = by_name["basic_filters"]
    assert filters.data.tags["cache_hit"] == "true" and filters.data.tags["component"] == "basic_filters"
    assert filters.data.tags["mlflow.runName"] == "basic_filters (cached)"
    shards = by_name["write_shards"]  # produced by the rerun after the kill, in this store
    producer = mlflow.MlflowClient().get_run(shards.data.tags["produced_by_run_id"])
    assert producer.data.tags["step"] == "write_shards" and producer.data.tags["cache_key"] == shards.data.tags["cache_key"]
    assert producer.data.tags["cache_hit"] == "false" and producer.data.metrics["shards"] == shards.data.metrics["shards"]
    assert {"cache_key", "git_commit", "profile", "output_dir"} <= set(filters.data.tags)
    assert filters.data.params["min_short_side"] == "200"
    assert filters.data.metrics["rows_in"] > filters.data.metrics["rows_kept"] > 0
    assert by_name["ingest"].data.tags["cache_hit"] == "false"
    assert latest.data.params["data.basic_filters.min_short_side"] == "200"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(latest.info.run_id)}
    assert {"resolved_config.yaml", "report"} <= artifacts


def test_ray_job_submit_against_local_head(tiny_run: PipelineRun, tmp_path: Path) -> None:
    """The data and ViT steps, and the post-training ones (SFT, rejection sampling, RL: the same training runtime
    and generation engine as the stages), come from the shared run's cache; the LLM, the VLM stages, their
    evaluations and the endpoint run as a job on a separate Ray head."""
    root = tmp_path / "runs"
    copy_cached_steps(tiny_run.root, root, (*ALL_STEPS, *POST_TRAINING))
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # head and client share it
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port, serve_port = free_port(), free_port(), free_port()
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
         f"--temp-dir={ray_temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_dashboard(address, head)
        submitted = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "pipelines/full.py", *SMALL, "--set", f"run.root={root}", "--set", f"serve.port={serve_port}"],
            env=env, capture_output=True, text=True, timeout=1500)
        assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
        assert "succeeded" in submitted.stdout
        ran = statuses(root)
        cached = (*ALL_STEPS, *POST_TRAINING)
        assert {name: ran[name] for name in cached} == {name: "cached" for name in cached}
        assert {ran[name] for name in ran if name not in cached} == {"ran"}
        assert {"llm_pretrain", "vlm_stage0", "vlm_eval_stage0", "vlm_stage2", "vlm_eval_stage2", "serve"} <= set(ran)
        # the job has ended; the endpoint it deployed lives on in the cluster
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/v1/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == "seedvl"
        stats = json.loads((Path(last_summary(root)["write_shards"]["output_dir"]) / "shards" / "stats.json")
                           .read_text())
        assert stats["tasks"]["caption"]["in"] == 240 and stats["kept"] > 0
    finally:
        stop_process_group(head)
        shutil.rmtree(ray_temp, ignore_errors=True)


def wait_for_dashboard(address: str, head: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 when Ray's token authentication is on)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {address} did not come up")
