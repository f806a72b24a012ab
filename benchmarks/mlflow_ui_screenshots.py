"""What a user sees in the MLflow UI, checked in a real browser: starts `mlflow ui` on 127.0.0.1 over a
run root's store, takes headless-chromium screenshots of the pages a user opens after a pipeline run,
and prints what each page is (a page that does not settle in time is reported and skipped).

    python pipelines/full.py --set run.root=/tmp/ui_runs --set serve.keep_alive=false   # twice: 2nd all cached
    python benchmarks/mlflow_ui_screenshots.py --root /tmp/ui_runs --out /tmp/ui_shots

Needs Debian's `chromium` (apt-get install chromium). The pages: the experiment's runs table, the
latest parent run (overview, the run report and its loss chart in the artifact viewer), a cached
stage's run and its metric charts, `train/loss` of the trained stages overlaid, an evaluation step's
gallery, the registered model version. The server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"mlflow ui did not answer on {url} within {timeout:.0f} s")


def screenshot(browser: str, url: str, path: Path, width: int = 1600, height: int = 1300,
               wait_ms: int = 15000) -> str:
    """'' when the page was captured, else why not (a page that never settles times out)."""
    try:
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--no-first-run", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=150)
    except subprocess.TimeoutExpired:
        return "timed out"
    except subprocess.CalledProcessError as error:
        return f"chromium failed: {error.stderr.decode(errors='replace')[-300:]}"
    return ""


def pages(client: object, experiment_id: str, base: str) -> list[tuple[str, str, str]]:
    """(file name, URL, what the page should show) for the latest pipeline run of the experiment."""
    runs = client.search_runs([experiment_id], max_results=1000, order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("kind") == "pipeline" and r.info.status == "FINISHED")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cached = [r for r in children if r.data.tags.get("cache_hit") == "true" and r.data.tags.get("step") == "vlm_stage1"]
    trained = [r for r in runs if r.data.tags.get("step", "").startswith("vlm_stage")
               and r.data.tags.get("cache_hit") == "false"]
    evals = [r for r in runs if r.data.tags.get("step") == "vlm_eval_stage2"]
    exp = f"{base}/#/experiments/{experiment_id}"
    run = f"{exp}/runs/{parent.info.run_id}"
    listed = [("01_runs_table.png", f"{exp}/runs", "the runs table (Model training view)"),
              ("02_parent_overview.png", run, "the latest pipeline run's overview"),
              ("03_parent_report.png", f"{run}/artifactPath/report/report.html",
               "the parent run's artifacts with report/report.html selected"),
              ("04_parent_loss_chart.png", f"{run}/artifactPath/report/training_loss.png",
               "the parent run's artifacts with report/training_loss.png selected")]
    if cached:
        listed.append(("05_cached_stage.png", f"{exp}/runs/{cached[0].info.run_id}",
                       f"a cached stage's run ({cached[0].data.tags['mlflow.runName']}): tags and metrics"))
        listed.append(("06_cached_stage_charts.png", f"{exp}/runs/{cached[0].info.run_id}/model-metrics",
                       "the cached stage's metric charts (train/* curves copied from the run that trained it)"))
    if trained:  # the metric page's own URL form (MLflow's getMetricPageRoute): JSON in the query
        def compact(value: object) -> str:
            return json.dumps(value, separators=(",", ":"))

        ids = compact([r.info.run_id for r in trained[:3]])
        listed.append(("07_loss_overlay.png", f"{base}/#/metric?runs={ids}&metric="
                       f"{urllib.parse.quote(compact('train/loss'))}&experiments={compact([experiment_id])}"
                       f"&plot_metric_keys={urllib.parse.quote(compact(['train/loss', 'train/loss_smoothed']))}"
                       "&x_axis=step",
                       "train/loss and train/loss_smoothed of three trained stages' runs overlaid"))
    if evals:
        listed.append(("08_eval_gallery.png", f"{exp}/runs/{evals[0].info.run_id}/artifactPath/outputs/eval/gallery/"
                       "stage2.png", "stage 2's evaluation gallery (contact sheet) in the artifact viewer"))
    listed.append(("09_model_version.png", f"{base}/#/models/seedvl/versions/{latest_version(client)}",
                   "the registered model version (description, tags, source run)"))
    return listed


def latest_version(client: object) -> str:
    versions = client.search_model_versions("name = 'seedvl'")
    return str(max(int(v.version) for v in versions)) if versions else "1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a run root holding mlflow.db and mlartifacts/")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlflow_ui_screenshots"))
    parser.add_argument("--experiment", default="seed-vl")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    database = args.root.resolve() / "mlflow.db"
    if not database.is_file():
        print(f"{database}: no MLflow store here; run the pipeline with --set run.root={args.root} first", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{database}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"no experiment {args.experiment!r} in {database}", file=sys.stderr)
        return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        wait_up(base)
        for name, url, what in pages(client, experiment.experiment_id, base):
            started = time.monotonic()
            problem = screenshot(browser, url, args.out / name)
            if problem == "timed out":  # a cold server on a busy machine: once more
                problem = screenshot(browser, url, args.out / name)
            print(f"{name:<28} {time.monotonic() - started:5.1f}s  {problem or what}\n{'':<36}{url}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"\nscreenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
