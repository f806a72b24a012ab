"""Config schema of the serving step (`serve`): where the endpoint binds, what it accepts, how requests
are batched, how many replicas hold the model, and the media and thinking settings of the chat API."""

from __future__ import annotations

import dataclasses

from components.vlm.modes import DIRECT_SYSTEM_PROMPT, THINKING_SYSTEM_PROMPT

THINKING_MODES = ("enabled", "disabled")
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})  # Pillow's names


@dataclasses.dataclass
class BatchingConfig:
    """Ray Serve request batching on the model replica (`@serve.batch`): requests that arrive within
    `batch_wait_timeout_s` of each other decode together, up to `max_batch_size` rows."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")


@dataclasses.dataclass
class AutoscalingConfig:
    """Serve autoscaling of the model deployment; when disabled, `serve.num_replicas` fixed replicas run."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}..{self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")


@dataclasses.dataclass
class ReplicaResources:
    """What one model replica reserves (never part of a cache key)."""

    num_cpus: float = 4.0
    num_gpus: float = 1.0
    torch_threads: int = 0  # 0: torch's default
    image: str = ""  # the infra/ image replicas run in on a cluster (openseedvl-serve); ignored locally

    def __post_init__(self) -> None:
        from components.common.placement import check_image_name

        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        check_image_name(self.image)


@dataclasses.dataclass
class MediaConfig:
    """Limits on the images and videos a request may carry, and how a video is sampled into frames
    (the dynamic frame-resolution rule of the data pipeline, with these budgets)."""

    max_images: int = 16  # image parts per request (a video's frames not counted)
    max_image_pixels: int = 40_000_000  # decoded width x height; larger images are refused (decompression bombs)
    max_request_pixels: int = 120_000_000  # all images and frames of one request together, decoded
    image_formats: list[str] = dataclasses.field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])
    remote_fetch: bool = False  # fetch http(s) image URLs at all
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)  # exact host names remote_fetch may reach
    fetch_timeout_s: float = 10.0
    max_fetch_bytes: int = 20_000_000
    max_video_frames: int = 256  # frames per video after sampling or as sent
    video_fps: float = 1.0
    video_min_frames: int = 16
    video_budgets: list[int] = dataclasses.field(default_factory=lambda: [640, 512, 384, 256, 160, 128])
    video_max_tokens: int = 24576
    video_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_images < 0 or self.max_video_frames < 1:
            raise ValueError("max_images must be >= 0 and max_video_frames >= 1")
        if self.max_image_pixels < 1 or self.max_fetch_bytes < 1:
            raise ValueError("max_image_pixels and max_fetch_bytes must be >= 1")
        if self.remote_fetch and not self.allowed_hosts:
            raise ValueError("remote_fetch is on but allowed_hosts is empty: list the host names images may come "
                             "from (e.g. [images.example.org]), or set remote_fetch=false")
        if not self.video_budgets or any(b < 1 for b in self.video_budgets):
            raise ValueError(f"video_budgets must be positive token counts, got {self.video_budgets}")
        if self.video_max_tokens < min(self.video_budgets):
            raise ValueError(f"video_max_tokens ({self.video_max_tokens}) is below the smallest video budget "
                             f"({min(self.video_budgets)}): no frame would fit")
        if not 0 < self.video_fps <= 5.0 or self.video_min_frames < 1:
            raise ValueError(f"video_fps must be in (0, 5] and video_min_frames >= 1, got {self.video_fps}, "
                             f"{self.video_min_frames}")
        if self.fetch_timeout_s <= 0 or self.video_timeout_s <= 0 or self.max_request_pixels < self.max_image_pixels:
            raise ValueError("fetch_timeout_s and video_timeout_s must be > 0, and max_request_pixels >= "
                             "max_image_pixels")
        unknown = sorted({name.upper() for name in self.image_formats} - IMAGE_FORMATS)
        if unknown:
            raise ValueError(f"image_formats {unknown} are not Pillow format names; use some of {sorted(IMAGE_FORMATS)}")


@dataclasses.dataclass
class ThinkingConfig:
    """The thinking switch: a request's `thinking.type` picks one of these system prompts (put before any
    system message of the request); the model's `<think>...</think>` span comes back as `reasoning_content`.
    The defaults are the strings the SFT step trains each mode with (`components/vlm/modes.py`); an export
    that no SFT step trained (stage 2's) answers non-thinking requests under the system prompt it was
    trained with instead, since the direct prompt means nothing to it."""

    default: str = "disabled"  # the mode of requests that do not say
    thinking_system_prompt: str = THINKING_SYSTEM_PROMPT  # the strings SFT trained the modes with
    non_thinking_system_prompt: str = DIRECT_SYSTEM_PROMPT  # an export without SFT falls back to its own prompt

    def __post_init__(self) -> None:
        if self.default not in THINKING_MODES:
            raise ValueError(f"default must be one of {THINKING_MODES}, got {self.default!r}")


@dataclasses.dataclass
class ServeConfig:
    """The OpenAI-style chat endpoint on Ray Serve over the pipeline's final VLM checkpoint."""

    enabled: bool = True
    model_name: str = "seedvl"  # the model id clients send, and the MLflow registered-model name
    register: bool = True  # register the checkpoint in the MLflow model registry before deploying
    app_name: str = "seedvl"  # the Serve application name
    host: str = "127.0.0.1"  # the HTTP proxy's bind address; 0.0.0.0 only behind your own network policy
    port: int = 8000
    route_prefix: str = "/"
    api_key_env: str = ""  # an environment variable holding the Bearer key clients must send; empty: no key
    max_request_bytes: int = 32_000_000  # request bodies above this get 413
    default_max_tokens: int = 256  # when a request does not say
    max_tokens_limit: int = 2048  # the most a request may ask for
    max_context_tokens: int = 32768  # prompt tokens (images included) + max_tokens
    max_pending_requests: int = 64  # per ingress replica; more in flight get 429
    max_queued_requests: int = 256  # Serve's own queue limit in front of each deployment
    num_replicas: int = 1  # model replicas when autoscaling is off
    ingress_replicas: int = 1
    device: str = "auto"  # auto: cuda when the replica has a GPU, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu; or float32 / bfloat16 / float16
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    keep_alive: bool | None = None  # after the pipeline, keep a local Ray (and the endpoint) up until Ctrl-C; null: when stdin is a terminal
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    autoscaling: AutoscalingConfig = dataclasses.field(default_factory=AutoscalingConfig)
    media: MediaConfig = dataclasses.field(default_factory=MediaConfig)
    thinking: ThinkingConfig = dataclasses.field(default_factory=ThinkingConfig)
    resources: ReplicaResources = dataclasses.field(default_factory=ReplicaResources)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(f"need 1 <= default_max_tokens <= max_tokens_limit, got {self.default_max_tokens} and "
                             f"{self.max_tokens_limit}")
        if self.max_context_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_context_tokens ({self.max_context_tokens}) must exceed max_tokens_limit "
                             f"({self.max_tokens_limit}) to leave room for the prompt")
        if self.max_request_bytes < 1024 or min(self.max_pending_requests, self.num_replicas, self.ingress_replicas) < 1:
            raise ValueError("max_request_bytes must be >= 1024; max_pending_requests, num_replicas and "
                             "ingress_replicas >= 1")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ValueError(f"max_queued_requests must be >= 1, or -1 for no limit, got {self.max_queued_requests}")
        if self.health_check_period_s <= 0 or self.health_check_timeout_s <= 0:
            raise ValueError("health_check_period_s and health_check_timeout_s must be > 0")
        if self.media.video_max_tokens > self.max_context_tokens - self.max_tokens_limit:
            raise ValueError(f"media.video_max_tokens ({self.media.video_max_tokens}) leaves no room in max_context_tokens "
                             f"({self.max_context_tokens}) for the answer (max_tokens_limit {self.max_tokens_limit}): "
                             "lower media.video_max_tokens or raise max_context_tokens")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.model_name or "/" in self.model_name:
            raise ValueError(f"model_name must be a non-empty name without '/', got {self.model_name!r}")
