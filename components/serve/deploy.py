"""Putting a checkpoint behind the endpoint: the `serve` pipeline step (register the final VLM export in the
MLflow model registry, deploy it on Ray Serve, send it one real request) and the standalone command
that serves a registry version or a checkpoint folder:

    python -m components.serve.deploy --model models:/seedvl/3            # a registered version
    python -m components.serve.deploy --model models:/seedvl@latest-pipeline
    python -m components.serve.deploy --model runs/cache/vlm_stage2/<key>/vlm/model --set serve.port=8001

The step is not cached: deploying is its point, so it runs whenever the pipeline reaches it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from components.common.contract import StageContext, StageResult, component
from components.serve.config import ServeConfig

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 300.0


def endpoint_url(cfg: ServeConfig) -> str:
    """Where clients on this machine reach the endpoint (a 0.0.0.0 bind is reached on 127.0.0.1)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def deploy(folder: Path, cfg: ServeConfig, model_id: str) -> str:
    """Start Serve's HTTP proxy on the configured address (if Serve is not up yet), run the application and
    wait until it answers its health route; returns the base URL."""
    from ray import serve

    from components.serve.app import build_app

    instance = uuid.uuid4().hex
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(folder, cfg, model_id, instance), name=cfg.app_name, route_prefix=cfg.route_prefix,
              blocking=False)
    url = endpoint_url(cfg)
    wait_healthy(url, instance=instance)
    return url


def wait_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S, instance: str = "") -> None:
    """Poll `url/health` until it answers 200 (from the application deployed as `instance`, if given: a
    server left on the same port by an earlier run does not count)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                answer = json.loads(response.read())
                if response.status == 200 and (not instance or answer.get("instance") == instance):
                    return
                last = f"answered by another application (instance {answer.get('instance')!r})"
        except (urllib.error.URLError, OSError, ValueError) as error:
            last = str(error)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s (last: {last}); is another "
                       "server holding the port? set serve.port")


def probe_image_url(size: int = 56) -> str:
    """A small PNG as a data URL, for the smoke request."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def smoke_request(url: str, model_id: str, api_key: str = "", max_tokens: int = 16) -> dict[str, Any]:
    """One real chat request with an image; the parsed response and its latency."""
    body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": probe_image_url()}},
                {"type": "text", "text": "Describe the image."}]}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    answer["latency_s"] = time.perf_counter() - started
    return answer


def api_key_of(cfg: ServeConfig) -> str:
    return os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""


def check_api_key(cfg: ServeConfig) -> str:
    """Before the pipeline runs: a named key variable must be set, or the endpoint would refuse to start
    after hours of training."""
    if cfg.enabled and cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        return (f"'serve.api_key_env' = {cfg.api_key_env}: that environment variable is not set, so the endpoint would "
                f"refuse to start after training: export {cfg.api_key_env}=<key>, or set serve.api_key_env=''")
    return ""


@component(name="serve", version="1", config="serve", inputs=("vlm", "eval"), optional_inputs=("eval",),
           outputs=("endpoint",), preflight=check_api_key)
def serve_step(ctx: StageContext[ServeConfig]) -> StageResult:
    """Register the final checkpoint (when tracking is on and serve.register is set), deploy it, ask it once."""
    cfg = ctx.config
    folder = ctx.inputs["vlm"] / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported VLM (no config.json)")
    record: dict[str, Any] = {"checkpoint": str(folder), "model": cfg.model_name}
    metrics: dict[str, float] = {}
    if cfg.register and ctx.tracking_uri:
        started = time.perf_counter()
        from components.serve.registry import register_checkpoint

        from mlflow.tracking import MlflowClient

        from components.serve.registry import lineage

        parent = MlflowClient(tracking_uri=ctx.tracking_uri).get_run(ctx.run_id).data.tags.get("mlflow.parentRunId", "")
        eval_input = ctx.inputs.get("eval")
        tags, description = lineage(ctx.inputs["vlm"].parent, eval_input.parent if eval_input else None, parent)
        version, new = register_checkpoint(ctx.tracking_uri, ctx.run_id, folder, cfg.model_name, tags, description)
        record["registered"] = f"models:/{cfg.model_name}/{version}"
        metrics |= {"registered_version": float(version), "registered_new": float(new),
                    "register_s": time.perf_counter() - started}
    started = time.perf_counter()
    url = deploy(folder, cfg, cfg.model_name)
    metrics["deploy_s"] = time.perf_counter() - started
    answer = smoke_request(url, cfg.model_name, api_key_of(cfg))
    metrics |= {"smoke_latency_s": answer["latency_s"], "smoke_prompt_tokens": answer["usage"]["prompt_tokens"],
                "smoke_completion_tokens": answer["usage"]["completion_tokens"]}
    record |= {"url": url, "smoke_answer": answer["choices"][0]["message"]["content"]}
    out = ctx.outputs["endpoint"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "endpoint.json").write_text(json.dumps(record, indent=1))
    log.info("serving %s at %s (%s)", cfg.model_name, url, record.get("registered", folder))
    return StageResult(metrics=metrics, artifacts=["endpoint/endpoint.json"])


def block_until_interrupted(url: str) -> None:
    """Keep this process (and a local Ray with the endpoint) alive until Ctrl-C or SIGTERM."""
    from ray import serve

    print(f"\nThe endpoint is up: {url}/v1/chat/completions (Ctrl-C stops it)", flush=True)
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop["now"]:
        time.sleep(0.5)
    serve.shutdown()


def keep_endpoint_up(cfg: ServeConfig, joined_cluster: bool, step_output: Path, registered: bool) -> None:
    """After a pipeline's `serve` step: a local Ray ends with the pipeline's process, and the endpoint with
    it, so with serve.keep_alive (by default when run from a terminal) stay up until Ctrl-C. In a cluster
    the pipeline joined (`ray job submit`), the Serve application outlives the job."""
    url = endpoint_url(cfg)
    if joined_cluster:
        print(f"\nThe endpoint stays up in the Ray cluster: {url}/v1/chat/completions")
        return
    keep_alive = cfg.keep_alive if cfg.keep_alive is not None else sys.stdin.isatty()
    if keep_alive:
        block_until_interrupted(url)
        return
    endpoint = json.loads((step_output / "endpoint" / "endpoint.json").read_text())
    model = f"models:/{cfg.model_name}@latest-pipeline" if registered else endpoint["checkpoint"]
    print(f"\nThe endpoint stops with this process (serve.keep_alive=true keeps it up). Serve the model again "
          f"with: python -m components.serve.deploy --model {model}")


def main(argv: list[str] | None = None) -> int:
    """Serve a registered version or a checkpoint folder with the profile's `serve` settings."""
    from components.common.config import ConfigError
    from components.common.ray_env import ensure_ray
    from components.schema import REPO_ROOT, load_config
    from components.common.model_registry import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="models:/<name>/<version>, models:/<name>@<alias>, or an exported VLM folder")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE")
    parser.add_argument("--detach", action="store_true",
                        help="return once deployed (the endpoint lives on only in a Ray cluster this joined)")
    args = parser.parse_args(argv)
    try:
        config, _ = load_config(args.profile, [], args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        resolved = resolve_model(args.model, config.tracking_uri, config.root / "serving" / "registry")
    except FileNotFoundError as error:
        print(f"model error: {error}", file=sys.stderr)
        return 2
    ensure_ray(config.ray.address, config.ray.num_cpus, config.ray.include_dashboard, REPO_ROOT)
    cfg = config.serve
    joined = bool(config.ray.address or os.environ.get("RAY_ADDRESS"))
    try:
        url = deploy(resolved.folder, cfg, cfg.model_name)
    except KeyboardInterrupt:  # Ctrl-C while deploying: take down what was started
        from ray import serve

        if not joined:
            serve.shutdown()
        return 130
    print(f"serving {resolved.label} as {cfg.model_name!r} at {url}", flush=True)
    if args.detach and joined:
        return 0
    block_until_interrupted(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
