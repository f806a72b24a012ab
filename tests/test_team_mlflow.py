"""The team MLflow of infra/mlflow-local.sh, for real: a PostgreSQL server (Debian's package) as the
backend store and `mlflow server --serve-artifacts` on 127.0.0.1; the pipeline (through `ingest`, a
few seconds of work) logs to it over HTTP, then a checkpoint is registered and resolved by alias the
way the serve step and the RayService do. Finds the parent and child runs, their artifacts (stored by
the server in its folder, not the client's), and the registered model with its alias."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_pipeline_e2e import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def postgres_installed() -> bool:
    return bool(shutil.which("initdb")) or any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


@pytest.fixture(scope="module")
def team_mlflow() -> Iterator[tuple[str, Path]]:
    if not postgres_installed():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    folder = Path(tempfile.mkdtemp(prefix="seedvl-mlflow-", dir="/tmp"))
    folder.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    port, pgport = free_port(), free_port()
    log = (folder / "server.log").open("w")
    env = os.environ | {"MLFLOW": str(Path(sys.executable).parent / "mlflow")}
    server = subprocess.Popen(["bash", str(REPO / "infra" / "mlflow-local.sh"), str(folder), str(port), str(pgport)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not come up:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield uri, folder
    finally:
        server.send_signal(signal.SIGTERM)  # the script stops mlflow, then PostgreSQL
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        pg_ctl = Path(shutil.which("pg_ctl") or next(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))).resolve()
        data = folder / "postgres"
        if (data / "postmaster.pid").exists():  # the script was killed before it could stop it
            as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
            subprocess.run([*as_pg, str(pg_ctl), "--pgdata", str(data), "--mode=immediate", "stop"], check=False)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_pipeline_logs_to_the_team_server(team_mlflow: tuple[str, Path], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri, folder = team_mlflow
    root = tmp_path / "runs"
    env = os.environ | {"SEEDVL_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                        "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "SEEDVL_RUN_ROOT", "MLFLOW_TRACKING_URI"):  # an earlier test's leftovers
        env.pop(name, None)
    command = [sys.executable, "pipelines/full.py", "--until", "ingest", "--set", f"run.root={root}",
               "--set", "ray.num_cpus=2", "--set", "data.synthetic_crawl.num_samples=40",
               "--set", "data.synthetic_crawl.num_shards=2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("seed-vl")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["component"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"synthetic_crawl", "ingest"}
    assert {r.info.status for r in [parent, *children.values()]} == {"FINISHED"}
    assert parent.data.params["profile"] == "tiny"
    assert children["ingest"].data.metrics  # counts and duration

    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"resolved_config.yaml", "config_sources.json", "summary.json"} <= names
    downloaded = Path(client.download_artifacts(parent.info.run_id, "resolved_config.yaml", str(tmp_path)))
    (local,) = root.glob("pipeline_runs/*/resolved_config.yaml")
    assert downloaded.read_text() == local.read_text()
    stored = list((folder / "artifacts").rglob("resolved_config.yaml"))
    assert len(stored) == 1 and parent.info.run_id in str(stored[0]), "the server keeps the artifacts"
    assert not (root / "mlartifacts").exists(), "the client wrote artifacts itself instead of sending them"


def test_registered_model_and_alias_on_the_team_server(team_mlflow: tuple[str, Path], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from components.common.model_registry import resolve_model
    from components.serve.registry import ALIAS, register_checkpoint

    uri, _ = team_mlflow
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("seed-vl") or client.get_experiment(client.create_experiment("seed-vl"))
    run_id = client.create_run(experiment.experiment_id, run_name="serve").info.run_id
    export = tmp_path / "export"
    (export / "llm").mkdir(parents=True)
    (export / "config.json").write_text('{"stage": "stage2"}')
    (export / "llm" / "config.json").write_text("{}")
    version, new = register_checkpoint(uri, run_id, export, "seedvl", {"checkpoint_key": "k1"})
    assert new
    assert register_checkpoint(uri, run_id, export, "seedvl", {"checkpoint_key": "k1"}) == (version, False)
    assert client.get_model_version_by_alias("seedvl", ALIAS).version == version
    resolved = resolve_model(f"models:/seedvl@{ALIAS}", uri, tmp_path / "registry")
    assert (resolved.name, resolved.version) == ("seedvl", version)
    assert (resolved.folder / "config.json").read_text() == '{"stage": "stage2"}'
    assert (resolved.folder / "llm" / "config.json").is_file()
