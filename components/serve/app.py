"""The Ray Serve application: `ChatIngress` (FastAPI: the OpenAI-style routes, auth, size and load limits,
request validation, media decoding and the prompt) in front of `VlmModel` (the checkpoint on its
device, decoding batches of requests with `@serve.batch` and streaming text deltas back).

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`),
`GET /v1/models`, `GET /health`. Every error is OpenAI-shaped, `{"error": {"message", "type", "param",
"code"}}`: 400 for bad JSON, schema, model name, base64 or images, 401 for a missing or wrong key when
one is configured, 413 for bodies over `serve.max_request_bytes`, 429 when more than
`serve.max_pending_requests` requests are in flight on an ingress replica. `build_app` is the typed
builder; `app_builder` is the same for `serve run components.serve.app:app_builder checkpoint=...`.
"""


import asyncio
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.common.placement import image_selector
from components.serve.config import ServeConfig
from components.generation.engine import Delta, GenerationEngine, GenerationInput
from components.serve.protocol import (
    SSE_DONE,
    ApiError,
    completion_chunk,
    completion_response,
    models_response,
    new_request_id,
    parse_chat_request,
    parse_json_body,
    sse_event,
    usage_chunk,
)

log = logging.getLogger(__name__)
api = FastAPI(title="Seed1.5-VL recipe chat endpoint", docs_url=None, redoc_url=None, openapi_url=None)
UNHEALTHY_AFTER_FAILURES = 3  # consecutive failed batches before check_health reports the replica broken
HEALTH_PING_TIMEOUT_S = 5.0
BUSY_GRACE_S = 60.0  # a model that finished a request this recently is busy, not broken, when a ping waits


@api.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return JSONResponse(ApiError(error.status_code, str(error.detail), code=code).body(), status_code=error.status_code)


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, error: Exception) -> JSONResponse:
    log.exception("request failed")
    body = ApiError(500, f"the server failed on this request ({type(error).__name__}); it keeps serving",
                    type="server_error", code="internal_error").body()
    return JSONResponse(body, status_code=500)


def resolve_device(cfg: ServeConfig) -> tuple[str, Any]:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and cfg.resources.num_gpus > 0 else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


class _Slot:
    """One of the ingress's `max_pending_requests` places: taken when made, released exactly once."""

    def __init__(self, ingress: Any) -> None:
        ingress.pending += 1
        self.ingress: Any = ingress

    def release(self) -> None:
        if self.ingress is not None:
            self.ingress.pending -= 1
            self.ingress = None


class _SlotStreamingResponse(StreamingResponse):
    """A streamed answer that gives its request's place back however the stream ends: sent in full, the
    client gone, or cancelled before the first byte (when a generator's own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[bytes], slot: _Slot, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


@serve.deployment
class VlmModel:
    """One model replica: loads the export (safetensors and a Hugging Face folder, no pickles) and
    decodes the requests that reach it in batches."""

    def __init__(self, checkpoint: str, cfg: ServeConfig) -> None:
        import torch

        from components.vlm.model import load_vlm

        if cfg.resources.torch_threads:
            torch.set_num_threads(cfg.resources.torch_threads)
        device, dtype = resolve_device(cfg)
        model, tokenizer, _ = load_vlm(checkpoint, device, dtype)
        self.engine = GenerationEngine(model, tokenizer)
        self.generate.set_max_batch_size(cfg.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        self.consecutive_failures = 0
        self.batches = 0
        self.rows = 0
        log.info("loaded %s on %s (%s)", checkpoint, device, dtype)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # the limits are reset from config in __init__
    async def generate(self, items: list[GenerationInput]) -> AsyncIterator[list[Any]]:
        """Stream the deltas of a batch of requests, one list per decode step (StopIteration marks a
        request that has ended)."""
        self.batches += 1
        self.rows += len(items)
        try:
            batch = await asyncio.to_thread(self.engine.start, items)
            while True:
                deltas = await asyncio.to_thread(self.engine.step, batch)
                yield [StopIteration if delta is None else delta for delta in deltas]
                if batch.done:
                    break
        except Exception:
            self.consecutive_failures += 1
            log.exception("a batch of %d requests failed", len(items))
            raise
        self.consecutive_failures = 0

    async def stream(self, item: GenerationInput) -> AsyncIterator[Delta]:
        """One request's deltas as they are decoded (the handle method: `options(stream=True).stream`)."""
        finished = False
        try:
            async for delta in self.generate(item):
                yield delta
                if delta.finish_reason is not None:  # done: do not wait for the rest of the batch
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away (client disconnected): stop decoding its row
                item.cancelled = True

    def stats(self) -> dict[str, float]:
        """Batches decoded, the requests in them (the benchmark's mean batch size), and the requests whose
        decoding stopped early because their client went away."""
        return {"batches": self.batches, "rows": self.rows, "cancelled": self.engine.cancelled_rows}

    def context_limit(self) -> int:
        return self.engine.context_limit

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose last batches all failed is restarted."""
        if self.consecutive_failures >= UNHEALTHY_AFTER_FAILURES:
            raise RuntimeError(f"the last {self.consecutive_failures} batches failed")


@serve.deployment
@serve.ingress(api)
class ChatIngress:
    """The HTTP front: everything a request can get wrong is answered here, before the model sees it."""

    def __init__(self, model: DeploymentHandle, checkpoint: str, cfg: ServeConfig, model_id: str,
                 instance: str = "") -> None:
        from components.vit.config import SeedViTConfig
        from components.vlm.tokenizer import load_tokenizer

        self.model, self.cfg, self.model_id, self.instance = model, cfg, model_id, instance
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
        self.vit_cfg = SeedViTConfig(**saved["vit"])
        # an SFT export was trained in both modes under the configured prompts; any other answers non-thinking
        # requests under the system prompt its training used
        trained_system = str(saved.get("system_prompt", "") or "")
        if not saved.get("answer_modes"):
            self.thinking = dataclasses.replace(cfg.thinking, non_thinking_system_prompt=trained_system)
        else:
            self.thinking = cfg.thinking
        self.last_answer = 0.0  # monotonic time the model last finished a request
        self.tokenizer = load_tokenizer(Path(checkpoint) / "llm")
        self.api_key = ""
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env, "")
            if not self.api_key:
                raise RuntimeError(f"serve.api_key_env={cfg.api_key_env!r} but that environment variable is empty "
                                   "on the ingress replica: export it where the deployment starts")
        self.pending = 0
        self.created = int(time.time())
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer must not encode in two threads at once

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(models_response([self.model_id], self.created))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 when the model deployment answers a ping, or is busy but finished a request in the last
        minute (a ping queues behind the requests in flight); 503 otherwise."""
        body = {"model": self.model_id, "instance": self.instance}
        try:
            await asyncio.wait_for(self.model.context_limit.remote(), timeout=HEALTH_PING_TIMEOUT_S)
        except asyncio.TimeoutError:
            if time.monotonic() - self.last_answer > BUSY_GRACE_S:
                return JSONResponse({"status": "unhealthy", "error": "the model did not answer", **body}, status_code=503)
            return JSONResponse({"status": "busy", **body})
        except Exception as error:  # noqa: BLE001 - any failure of the model replica means unhealthy
            return JSONResponse({"status": "unhealthy", "error": str(error)[:500], **body}, status_code=503)
        return JSONResponse({"status": "ok", **body})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        if self.pending >= self.cfg.max_pending_requests:
            raise ApiError(429, f"the server is at its limit of {self.cfg.max_pending_requests} requests in flight; "
                           "retry after a moment", type="rate_limit_error", code="rate_limit_exceeded")
        slot: _Slot | None = _Slot(self)
        try:
            chat = parse_chat_request(
                parse_json_body(await self._body(request)), served_model=self.model_id,
                default_max_tokens=self.cfg.default_max_tokens, max_tokens_limit=self.cfg.max_tokens_limit,
                default_thinking=self.cfg.thinking.default == "enabled")
            item = await asyncio.to_thread(self._prepare, chat)
            request_id, created = new_request_id(), int(time.time())
            deltas = self.model.options(stream=True).stream.remote(item)
            first = await self._first_delta(deltas)  # errors before any byte is sent keep their status
            if chat.stream:
                stream = self._sse(first, deltas, chat.include_usage, request_id, created)
                response = _SlotStreamingResponse(stream, slot, media_type="text/event-stream")
                slot = None  # the response releases it when it has been sent or abandoned
                return response
            return JSONResponse(await self._complete(first, deltas, request_id, created, chat.thinking))
        finally:
            if slot is not None:
                slot.release()

    async def _first_delta(self, deltas: Any) -> Delta:
        from ray.serve.exceptions import BackPressureError

        try:
            return await deltas.__anext__()
        except BackPressureError as error:
            raise ApiError(429, "the model's queue is full; retry after a moment", type="rate_limit_error",
                           code="rate_limit_exceeded") from error

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes the limit (declared or streamed)."""
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is over the {limit}-byte limit (serve.max_request_bytes); send "
                             "smaller or fewer images", code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _prepare(self, chat: Any) -> GenerationInput:
        from components.serve.prompting import build_input, decode_media

        media = decode_media(chat, self.cfg.media)
        return build_input(chat, media, self.tokenizer, self.vit_cfg, self.thinking, self.cfg.max_context_tokens,
                           self.tokenizer_lock)

    async def _complete(self, first: Delta, deltas: Any, request_id: str, created: int,
                        thinking: bool) -> dict[str, Any]:
        reasoning, content, last = [first.reasoning], [first.content], first
        async for delta in deltas:
            reasoning.append(delta.reasoning)
            content.append(delta.content)
            last = delta
        self.last_answer = time.monotonic()
        reasoning_text = "".join(reasoning)
        return completion_response(
            request_id=request_id, model=self.model_id, created=created, content="".join(content),
            reasoning=reasoning_text if (reasoning_text or thinking) else None,
            finish_reason=last.finish_reason or "stop", prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens)

    async def _sse(self, first: Delta, deltas: Any, include_usage: bool, request_id: str,
                   created: int) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return sse_event(completion_chunk(request_id=request_id, model=self.model_id, created=created, delta=delta,
                                              finish_reason=finish_reason))

        async def all_deltas() -> AsyncIterator[Delta]:
            yield first
            async for delta in deltas:
                yield delta

        last = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for delta in all_deltas():
                if delta.reasoning:
                    yield chunk({"reasoning_content": delta.reasoning})
                if delta.content:
                    yield chunk({"content": delta.content})
                last = delta
            self.last_answer = time.monotonic()
            yield chunk({}, last.finish_reason or "stop")
            if include_usage:
                yield sse_event(usage_chunk(request_id=request_id, model=self.model_id, created=created,
                                            prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens))
        except Exception as error:  # noqa: BLE001 - after the headers, an error can only be an event
            log.exception("stream %s failed", request_id)
            yield sse_event(ApiError(500, f"generation failed: {type(error).__name__}", type="server_error",
                                     code="generation_failed").body())
        yield SSE_DONE


def deployment_options(cfg: ServeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve options of the model and ingress deployments, from config."""
    model: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.resources.num_cpus, "num_gpus": cfg.resources.num_gpus},
        "max_ongoing_requests": max(2 * cfg.batching.max_batch_size, 4),
        "max_queued_requests": cfg.max_queued_requests,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
    }
    if cfg.autoscaling.enabled:
        model["autoscaling_config"] = {"min_replicas": cfg.autoscaling.min_replicas,
                                       "max_replicas": cfg.autoscaling.max_replicas,
                                       "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests}
    else:
        model["num_replicas"] = cfg.num_replicas
    ingress_actor: dict[str, Any] = {"num_cpus": 0}  # the key, if any, comes from the replica's own environment
    selector = image_selector(cfg.resources.image)  # on a cluster labelled by image; empty on a local Ray
    if selector:
        model["ray_actor_options"]["label_selector"] = selector
        ingress_actor["label_selector"] = selector
    ingress = {"num_replicas": cfg.ingress_replicas, "ray_actor_options": ingress_actor,
               "max_ongoing_requests": 2 * cfg.max_pending_requests, "max_queued_requests": cfg.max_queued_requests}
    return model, ingress


def build_app(checkpoint: str | Path, cfg: ServeConfig, model_id: str, instance: str = "") -> Application:
    """The application for one exported checkpoint folder, served under the model id `model_id`; `/health`
    reports `instance`, so a deployer can tell its own application from another one on the same port."""
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ValueError(f"serve.api_key_env={cfg.api_key_env!r} names an environment variable that is not set: export "
                         f"{cfg.api_key_env}=<key>, or set serve.api_key_env='' to serve without a key")
    model_options, ingress_options = deployment_options(cfg)
    model = VlmModel.options(**model_options).bind(str(checkpoint), cfg)
    return ChatIngress.options(**ingress_options).bind(model, str(checkpoint), cfg, model_id, instance)


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run components.serve.app:app_builder checkpoint=<folder> [profile=tiny] [model_id=seedvl]`
    (`checkpoint` may also be `models:/<name>/<version>`; config comes from the profile's `serve`). In a
    Serve config file (cluster/rayservice.yaml), `args.set` is a list of `key.path=value` overrides, as
    `--set` on the command line."""
    from components.common.config import ConfigError
    from components.schema import load_config
    from components.common.model_registry import resolve_model

    unknown = sorted(set(args) - {"checkpoint", "profile", "model_id", "set"})
    if unknown or "checkpoint" not in args:
        raise ConfigError(f"app_builder args {sorted(args)}: give checkpoint (a folder or "
                          "models:/<name>/<version|@alias>) and optionally profile, model_id and set (a list of "
                          f"key.path=value); unknown: {unknown}")
    overrides = args.get("set") or []
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    config, _ = load_config(args.get("profile", "tiny"), overrides=overrides)
    resolved = resolve_model(args["checkpoint"], config.tracking_uri, config.root / "serving" / "registry")
    return build_app(resolved.folder, config.serve, args.get("model_id", config.serve.model_name))
