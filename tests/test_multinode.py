"""A real two-node Ray run: a head and a second node started as separate `ray start` processes on this
machine (2 logical CPUs each, their own ports), the pipeline submitted with `ray job submit` through the
data steps and the ViT pretraining step with `run.root` on a folder both nodes see; the data tasks ran
on both nodes, and every step has the cache key of the session's shared single-node run of the same
config, the same output rows and the same shard bytes. Everything is stopped by
process group; nothing else on the machine is touched (no `ray stop`)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from pipeline_runs import DATA_STEPS, SMALL, PipelineRun, free_port, last_summary, stop_process_group
from test_pipeline_e2e import wait_for_dashboard

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e
UNTIL = "vit_pretrain"
CONFIG = [*SMALL, "--until", UNTIL]  # the shared run's settings: it is the single-node run compared against


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def node_ports() -> list[str]:
    """Every port a Ray node binds by default on its own, so a second node on this host collides with none."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def table_rows(folder: Path) -> list[str]:
    """The rows of every parquet file under `folder`, as sorted JSON lines: the content, whatever the blocks."""
    rows = []
    for path in sorted(folder.rglob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows.append(json.dumps({k: (hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else v)
                                    for k, v in row.items()}, sort_keys=True, default=str))
    return sorted(rows)


def cluster_state(kind: str, address: str, env: dict[str, str]) -> list[SimpleNamespace]:
    """Ray's state API (`nodes`, or finished `tasks`) queried from a child process with the cluster's token,
    so this test process never loads token authentication (a later in-process local Ray would inherit it)."""
    query = ("import dataclasses, json, sys\n"
             "from ray.util.state import list_nodes, list_tasks\n"
             f"address = {address!r}\n"
             "found = (list_nodes(address=address, raise_on_missing_output=False) if sys.argv[1] == 'nodes' else\n"
             "         list_tasks(address=address, filters=[('state', '=', 'FINISHED')], detail=True, limit=10000,\n"
             "                    raise_on_missing_output=False))\n"
             "print(json.dumps([dataclasses.asdict(item) for item in found], default=str))\n")
    done = subprocess.run([sys.executable, "-c", query, kind], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return [SimpleNamespace(**item) for item in json.loads(done.stdout.strip().splitlines()[-1])]


def test_two_node_run_matches_a_single_node_run(tiny_run: PipelineRun, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    local_env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
                              "HF_HUB_OFFLINE": "1"}
    for name in ("RAY_ADDRESS", "SEEDVL_RUN_ROOT", "SEEDVL_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        local_env.pop(name, None)
    env = local_env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # both nodes and the client
    shared = Path(tempfile.mkdtemp(prefix="seedvl-2n-", dir="/tmp"))  # both nodes see it (one host)
    try:
        run_and_compare(shared, tmp_path, env, tiny_run)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def run_and_compare(shared: Path, tmp_path: Path, env: dict[str, str], tiny_run: PipelineRun) -> None:
    bin_dir = Path(sys.executable).parent
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs_port, dashboard_port = free_port(), free_port()
    head = start([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                  f"--ray-client-server-port={free_port()}", f"--temp-dir={ray_temp}", *node_ports()],
                 env, tmp_path / "head.log")
    worker = None
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_dashboard(address, head)
        import ray._private.services as services

        host = services.get_node_ip_address()  # Ray registers nodes under this address, not 127.0.0.1
        worker = start([str(bin_dir / "ray"), "start", "--block", f"--address={host}:{gcs_port}", "--num-cpus=2",
                        f"--temp-dir={ray_temp}", *node_ports()], env, tmp_path / "worker.log")
        deadline, error = time.monotonic() + 120, None
        while True:
            try:
                alive = [n for n in cluster_state("nodes", address, env) if n.state == "ALIVE"]
            except Exception as caught:  # noqa: BLE001 - the state API answers once the head is fully up
                alive, error = [], caught
            if len(alive) == 2:
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the second node did not join: {alive} {error!r}"
            time.sleep(2)

        cluster_root = shared / "cluster"
        submitted = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "pipelines/full.py", *CONFIG, "--set", f"run.root={cluster_root}"],
            env=env, capture_output=True, text=True, timeout=900)
        assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]

        tasks = cluster_state("tasks", address, env)
        data_nodes = {t.node_id for t in tasks if t.func_or_class_name == "_map_task"}  # Ray Data's map tasks
        seen = sorted({(t.func_or_class_name, t.node_id[:8] if t.node_id else None) for t in tasks})
        assert len(data_nodes) == 2, f"the data tasks ran on {len(data_nodes)} node(s): {seen}"
    finally:
        for process in (worker, head):
            if process is not None:
                stop_process_group(process)
        shutil.rmtree(ray_temp, ignore_errors=True)

    # the single-node run is the session's shared run, with the same settings and code
    on_cluster = {name: step for name, step in last_summary(cluster_root).items() if step["status"] != "skipped"}
    alone = tiny_run.steps
    assert list(on_cluster) == [*DATA_STEPS, UNTIL]
    assert {name: step["status"] for name, step in on_cluster.items()} == {name: "ran" for name in on_cluster}
    for name in on_cluster:
        assert on_cluster[name]["cache_key"] == alone[name]["cache_key"], name
    for name in ("ingest", "basic_filters", "dedup"):
        assert table_rows(Path(on_cluster[name]["output_dir"])) == table_rows(Path(alone[name]["output_dir"])), name
    shards = [sorted((p.relative_to(Path(step["output_dir"])).as_posix(), p.read_bytes())
                     for p in Path(step["output_dir"]).rglob("*.tar"))
              for step in (on_cluster["write_shards"], alone["write_shards"])]
    assert shards[0] == shards[1] and shards[0], "the shards differ from the single-node run's"
    assert on_cluster[UNTIL]["metrics"]["steps"] == alone[UNTIL]["metrics"]["steps"] > 0
