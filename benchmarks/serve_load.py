"""Load test of the chat endpoint on 127.0.0.1: N concurrent clients for a fixed time against the same
checkpoint deployed with request batching and without it, in one run; p50/p99 latency, output tokens/s,
requests/s, errors, and the batched/unbatched throughput ratio.

    .venv/bin/python benchmarks/serve_load.py                        # the last pipeline's registered model
    .venv/bin/python benchmarks/serve_load.py --root /tmp/tiny_cold  # ... of a pipeline run with that run.root
    .venv/bin/python benchmarks/serve_load.py --model runs/cache/vlm_stage2/<key>/vlm/model
    .venv/bin/python benchmarks/serve_load.py --clients 8 --duration 30 --max-tokens 32 --batch-sizes 1,8

Every request is a user message with one image (a seeded random picture, PNG data URL) and a question,
non-streaming, `temperature: 0`, `max_tokens` fixed; answers end at the model's end token or there.
Each configuration gets a fresh deployment of the same checkpoint (Serve's HTTP proxy on 127.0.0.1),
two warm-up requests, then `--clients` threads that send requests back to back until `--duration`
seconds have passed (requests in flight then finish and count). Latency is per request, client side.
Output tokens/s is the completion tokens of successful requests over the wall time from the first
send to the last answer. Mean batch is the requests per decode batch the model replica reports. Then
`--burst` of the same requests, already preprocessed, go at once to the model deployment's handle (no
HTTP, no image decoding): the replica's own throughput with a full queue, where batching shows most.
The table is printed, recorded in benchmarks/results/serve_load.json and written into README.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_file import record  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "serve_load.json"
README = REPO / "README.md"
QUESTIONS = ("Describe the image.", "What is shown in this picture?", "How many shapes are there?",
             "What colour is the largest shape?", "Write a short caption for the image.")


def request_bodies(model_id: str, count: int, max_tokens: int, seed: int) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        image = Image.new("RGB", (rng.randrange(84, 336), rng.randrange(84, 336)), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randrange(1, 4)):
            x, y = rng.randrange(image.width - 20), rng.randrange(image.height - 20)
            draw.ellipse((x, y, x + 20, y + 20), fill=tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": rng.choice(QUESTIONS)}]}]}
        bodies.append(json.dumps(body).encode())
    return bodies


def send(url: str, body: bytes) -> tuple[int, float, int]:
    """(HTTP status, seconds, completion tokens) of one request."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
            return response.status, time.perf_counter() - started, int(answer["usage"]["completion_tokens"])
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - started, 0
    except (urllib.error.URLError, OSError):
        return 0, time.perf_counter() - started, 0


def load(url: str, bodies: list[bytes], clients: int, duration_s: float) -> dict[str, Any]:
    """`clients` threads sending back to back until the deadline; the results of every request."""
    results: list[tuple[int, float, int]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s

    def client(index: int) -> None:
        turn = index
        while time.perf_counter() < deadline:
            outcome = send(url, bodies[turn % len(bodies)])
            turn += clients
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = [r for r in results if r[0] == 200]
    latencies = sorted(r[1] for r in ok)

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 2),
            "p50_s": round(quantile(0.50), 3), "p99_s": round(quantile(0.99), 3),
            "mean_s": round(statistics.fmean(latencies), 3) if latencies else float("nan"),
            "output_tokens": sum(r[2] for r in ok), "tokens_per_s": round(sum(r[2] for r in ok) / wall, 1),
            "requests_per_s": round(len(ok) / wall, 2)}


def generation_inputs(folder: Path, cfg: Any, bodies: list[bytes], model_id: str) -> list[Any]:
    """The requests as the ingress hands them to the model deployment (for the burst through its handle)."""
    from components.serve.prompting import build_input, decode_media
    from components.serve.protocol import parse_chat_request, parse_json_body
    from components.vit.config import SeedViTConfig
    from components.vlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder / "llm")
    vit_cfg = SeedViTConfig(**json.loads((folder / "config.json").read_text())["vit"])
    inputs = []
    for body in bodies:
        chat = parse_chat_request(parse_json_body(body), served_model=model_id, default_max_tokens=16,
                                  max_tokens_limit=cfg.max_tokens_limit, default_thinking=False)
        inputs.append(build_input(chat, decode_media(chat, cfg.media), tokenizer, vit_cfg, cfg.thinking,
                                  cfg.max_context_tokens))
    return inputs


def burst(handle: Any, inputs: list[Any]) -> dict[str, Any]:
    """All `inputs` sent at once to the model deployment's handle (no HTTP, no preprocessing): how fast
    the replica alone turns a full queue into tokens."""
    import asyncio

    async def one(item: Any) -> int:
        tokens = 0
        async for delta in handle.options(stream=True).stream.remote(item):
            tokens = delta.completion_tokens
        return tokens

    async def everything() -> list[int]:
        return await asyncio.gather(*(one(item) for item in inputs))

    started = time.perf_counter()
    tokens = asyncio.run(everything())
    wall = time.perf_counter() - started
    return {"burst_requests": len(inputs), "burst_s": round(wall, 2), "burst_tokens_per_s": round(sum(tokens) / wall, 1)}


def run_config(folder: Path, cfg: Any, batch_size: int, bodies: list[bytes], clients: int, duration_s: float,
               model_id: str, inputs: list[Any]) -> dict[str, Any]:
    import dataclasses

    from ray import serve

    from components.serve.deploy import deploy

    cfg = dataclasses.replace(cfg, batching=dataclasses.replace(cfg.batching, max_batch_size=batch_size),
                              app_name=f"bench-{batch_size}")
    url = deploy(folder, cfg, model_id)
    for body in bodies[:2]:  # warm-up: the first request pays for lazy initialisation
        send(url, body)
    handle = serve.get_deployment_handle("VlmModel", app_name=cfg.app_name)
    before = handle.stats.remote().result()
    row = load(url, bodies, clients, duration_s)
    after = handle.stats.remote().result()
    batches = after["batches"] - before["batches"]
    row = {"max_batch_size": batch_size, **row,
           "mean_batch": round((after["rows"] - before["rows"]) / batches, 2) if batches else float("nan"),
           **burst(handle, inputs)}
    serve.delete(cfg.app_name)
    return row


def table(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    lines = ["| max batch | clients x s | requests | errors | p50 s | p99 s | output tok/s | req/s | mean batch | "
             "tok/s vs unbatched | burst tok/s (handle) | burst vs unbatched |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ratio = row["tokens_per_s"] / baseline["tokens_per_s"] if baseline["tokens_per_s"] else float("nan")
        burst_ratio = (row["burst_tokens_per_s"] / baseline["burst_tokens_per_s"] if baseline["burst_tokens_per_s"]
                       else float("nan"))
        lines.append(f"| {row['max_batch_size']} | {row['clients']} x {row['duration_s']:.0f} | {row['requests']} | "
                     f"{row['errors']} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{row['requests_per_s']:.2f} | {row['mean_batch']:.2f} | {ratio:.2f}x | "
                     f"{row['burst_tokens_per_s']:.1f} | {burst_ratio:.2f}x |")
    return "\n".join(lines)


def write_readme_block(text: str) -> None:
    start, end = "<!-- serve-load:start -->", "<!-- serve-load:end -->"
    readme = README.read_text()
    if start not in readme:
        print(f"README has no {start} block; not updated")
        return
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    README.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", readme))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/seedvl@latest-pipeline",
                        help="models:/<name>/<version>, models:/<name>@<alias>, or an exported VLM folder")
    parser.add_argument("--profile", default="tiny", help="whose run root, MLflow store and serve settings to use")
    parser.add_argument("--root", default="", help="the pipeline's run.root (default: the profile's, runs/)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per configuration")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8", help="max_batch_size of each configuration; the first is the "
                        "baseline of the ratio")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--burst", type=int, default=32, help="requests sent at once through the model handle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()

    import ray
    from ray import serve

    from components.schema import load_config
    from components.common.model_registry import resolve_model

    overrides = [f"serve.max_pending_requests={max(64, 4 * args.clients)}", *([f"run.root={args.root}"] if args.root else [])]
    config, _ = load_config(args.profile, [], overrides)
    resolved = resolve_model(args.model, config.tracking_uri, config.root / "serving" / "registry")
    model_id = config.serve.model_name
    bodies = request_bodies(model_id, 64, args.max_tokens, args.seed)
    inputs = generation_inputs(resolved.folder, config.serve, bodies[:args.burst], model_id)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    rows = []
    try:
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            row = run_config(resolved.folder, config.serve, batch_size, bodies, args.clients, args.duration, model_id,
                             inputs)
            row |= {"clients": args.clients, "duration_s": args.duration}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    text = table(rows, rows[0])
    note = (f"Checkpoint {resolved.label}; {args.clients} clients x {args.duration:.0f} s per configuration, one image "
            f"+ question per request, max_tokens {args.max_tokens}, greedy; one model replica "
            f"({config.serve.resources.num_cpus:g} CPU, {config.serve.resources.torch_threads or 'default'} torch "
            "threads).")
    print("\n" + text + "\n\n" + note)
    record(RESULTS, {"model": resolved.label, "clients": args.clients, "duration_s": args.duration,
                     "max_tokens": args.max_tokens, "profile": args.profile}, rows)
    if not args.no_readme:
        write_readme_block(text + "\n\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
