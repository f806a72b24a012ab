"""Typed configs of the data stages; their defaults are DataComp's basic-filter defaults."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from components.common.model_registry import MODEL_URI
from components.common.resources import Resources

NOISE_KINDS = (
    "mismatched_caption",
    "exact_duplicate",
    "near_duplicate",
    "tiny_image",
    "extreme_aspect",
    "corrupt_image",
    "empty_caption",
    "non_utf8_caption",
)


@dataclasses.dataclass
class NoiseRates:
    """Fraction of generated samples carrying each kind of labelled noise (the rest are clean)."""

    mismatched_caption: float = 0.10
    exact_duplicate: float = 0.03
    near_duplicate: float = 0.05
    tiny_image: float = 0.03
    extreme_aspect: float = 0.03
    corrupt_image: float = 0.02
    empty_caption: float = 0.02
    non_utf8_caption: float = 0.02

    def __post_init__(self) -> None:
        rates = dataclasses.asdict(self)
        if any(r < 0 for r in rates.values()) or sum(rates.values()) > 0.9:
            raise ValueError(f"noise rates must be >= 0 and sum to <= 0.9, got {rates}")


@dataclasses.dataclass
class SyntheticCrawlConfig:
    """A labelled synthetic 'web crawl' written as img2dataset-format shards."""

    enabled: bool = True
    num_samples: int = 1000
    num_shards: int = 4
    min_side: int = 200  # clean images: shorter side at least this
    max_side: int = 512  # clean images: longer side at most this
    max_clean_aspect: float = 2.5
    jpeg_quality: int = 90
    colour_skew: float = 0.0  # Zipf exponent over object colours: > 0 gives a head and a tail to rebalance
    noise: NoiseRates = dataclasses.field(default_factory=NoiseRates)
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.num_shards < 1:
            raise ValueError("num_samples and num_shards must be >= 1")
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError(f"need 32 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if self.max_clean_aspect < 1:
            raise ValueError("max_clean_aspect must be >= 1")
        if self.colour_skew < 0:
            raise ValueError(f"colour_skew must be >= 0, got {self.colour_skew}")


@dataclasses.dataclass
class SourceConfig:
    """One external input: img2dataset/WebDataset tars, parquet files, or a folder of images."""

    kind: Literal["webdataset", "parquet", "folder"]
    path: str
    name: str = ""  # prefix of sample keys and the `source` column; defaults to the path's stem
    caption_column: str = "caption"  # parquet: column with the caption text
    image_column: str = "image"  # parquet: column with encoded image bytes ...
    path_column: str = "path"  # ... or with image paths (relative to the parquet file)
    fingerprint: Literal["content", "stat"] = "content"  # how file changes enter the cache key


@dataclasses.dataclass
class IngestConfig:
    """Which sources to read, besides the synthetic crawl when it is enabled."""

    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    max_image_pixels: int = 178_956_970  # larger images are dropped (decompression-bomb guard)
    signals: bool = True  # dedup's sha256, pHash and thumbnail on ingest's own decode (no second decode)
    resources: Resources = dataclasses.field(default_factory=Resources)


@dataclasses.dataclass
class BasicFiltersConfig:
    """DataComp's basic filter: image size, aspect ratio, caption length."""

    min_short_side: int = 200
    max_aspect_ratio: float = 3.0
    min_caption_words: int = 3  # DataComp: more than 2 words
    min_caption_chars: int = 6  # DataComp: more than 5 characters
    resources: Resources = dataclasses.field(default_factory=Resources)


@dataclasses.dataclass
class ClipScorerConfig:
    """Training the tiny profile's own open_clip scorer on clean synthetic pairs."""

    enabled: bool = False  # off where a real CLIP checkpoint is given in data.clip_filter.weights
    architecture: str = "seedvl-tiny-clip"  # configs/open_clip/<name>.json or an open_clip name
    train_samples: int = 3000
    eval_samples: int = 400
    render_max_side: int = 320
    batch_size: int = 64
    learning_rate: float = 5e-4  # 1e-3 and above did not learn within a few hundred steps here
    max_steps: int = 250  # the budget is in steps (reproducible); max_seconds only caps a slow machine
    max_seconds: float = 600.0
    expected_mismatch_rate: float = 0.1  # prior used to calibrate the threshold (precision depends on it)
    # The crawl the calibrated threshold is for: held-out pairs are drawn by its generator with these
    # settings (sizes, colour skew, formats, near duplicates); set them as in data.synthetic_crawl.
    calibration_crawl: SyntheticCrawlConfig = dataclasses.field(default_factory=SyntheticCrawlConfig)
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(num_cpus=2))


@dataclasses.dataclass
class ClipFilterConfig:
    """CLIP-score filter: drop pairs whose image-caption cosine similarity is too low."""

    enabled: bool = True
    architecture: str = "ViT-L-14"  # any open_clip name (ignored when the scorer step trains one)
    weights: str = ""  # a local checkpoint file; required unless data.clip_scorer.enabled
    mode: Literal["threshold", "fraction", "calibrated"] = "threshold"
    threshold: float = 0.2  # mode threshold: keep score >= this
    keep_fraction: float = 0.7  # mode fraction: keep the top fraction (threshold = quantile, as DataComp)
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(num_cpus=1, concurrency=1,
                                                                                  batch_size=64))

    def __post_init__(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")


@dataclasses.dataclass
class DedupConfig:
    """Exact and perceptual (pHash) dedup; the representative of a group is its largest image."""

    enabled: bool = True
    phash_threshold: int = 8  # Hamming distance on 64-bit pHash at or under which images are candidates
    verify: bool = True  # candidates must also agree on aspect ratio and thumbnail (or be byte-identical)
    max_aspect_change: float = 0.1  # |log(aspect a / aspect b)|
    max_thumbnail_diff: int = 72  # largest difference of any cell and channel of the 8x8 RGB thumbnails (0-255)
    max_bucket: int = 1000  # LSH buckets larger than this are compared with a bounded window
    against: list[str] = dataclasses.field(default_factory=list)  # earlier write_shards folders to dedup against
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if not 0 <= self.phash_threshold <= 32:
            raise ValueError(f"phash_threshold must be in [0, 32], got {self.phash_threshold}")


@dataclasses.dataclass
class RebalanceConfig:
    """Concept rebalancing: cap the head (MetaCLIP's per-concept cap), repeat the tail."""

    enabled: bool = True
    concept_source: Literal["caption", "meta"] = "caption"
    meta_field: str = ""  # concept_source meta: dotted path into the sample's meta JSON, e.g. "cls"
    vocabulary: list[str] = dataclasses.field(default_factory=list)  # matched in captions; empty: top_k words
    top_k: int = 50
    max_per_concept: int = 0  # head cap; 0 = no cap
    min_per_concept: int = 0  # tail target: samples of rarer concepts are repeated; 0 = no repeats
    max_repeat: int = 3  # at most this many extra copies of one sample
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.concept_source == "meta" and not self.meta_field:
            raise ValueError("concept_source 'meta' needs meta_field (a dotted key of the sample's meta JSON)")
        if min(self.top_k, self.max_per_concept, self.min_per_concept, self.max_repeat) < 0:
            raise ValueError("top_k, max_per_concept, min_per_concept and max_repeat must be >= 0")
        if self.max_per_concept and self.min_per_concept > self.max_per_concept:
            raise ValueError(f"min_per_concept ({self.min_per_concept}) must not exceed max_per_concept "
                             f"({self.max_per_concept})")


@dataclasses.dataclass
class OcrConfig:
    """Synthetic OCR samples: scene text, documents, tables and charts with exact text and QA."""

    enabled: bool = True
    num_samples: int = 20000
    kinds: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"scene_text": 0.3, "document": 0.3, "table": 0.2, "chart": 0.2})  # proportions
    min_side: int = 224
    max_side: int = 768
    max_aspect: float = 2.0
    font_dirs: list[str] = dataclasses.field(default_factory=lambda: ["/usr/share/fonts"])  # none found: built-in
    max_rotation_deg: float = 15.0
    max_questions: int = 4  # besides the transcription
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(batch_size=32))

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - {"scene_text", "document", "table", "chart"}
        if unknown or not self.kinds or min(self.kinds.values()) < 0 or sum(self.kinds.values()) <= 0:
            raise ValueError(f"kinds must weight scene_text / document / table / chart (>= 0, some > 0), "
                             f"got {self.kinds}")
        if not 160 <= self.min_side <= self.max_side:  # the renderer needs at least 160 x 80
            raise ValueError(f"need 160 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if self.num_samples < 0 or self.max_aspect < 1 or not 0 <= self.max_rotation_deg <= 90:
            raise ValueError("num_samples must be >= 0, max_aspect >= 1, max_rotation_deg in [0, 90]")


@dataclasses.dataclass
class GroundingConfig:
    """Synthetic grounding (referring expression -> box/point) and counting samples."""

    enabled: bool = True
    num_samples: int = 20000  # scenes; each gives one grounding and one counting sample
    min_side: int = 224
    max_side: int = 640
    max_aspect: float = 2.0
    layouts: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"sparse": 0.4, "crowded": 0.3, "occluded": 0.3})  # proportions
    min_visible_fraction: float = 0.4  # a counted object keeps at least this share of its pixels visible
    max_questions: int = 4  # per sample
    ask_points: bool = True  # every other referring question asks for a point instead of a box
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(batch_size=32))

    def __post_init__(self) -> None:
        unknown = set(self.layouts) - {"sparse", "crowded", "occluded"}
        if unknown or not self.layouts or min(self.layouts.values()) < 0 or sum(self.layouts.values()) <= 0:
            raise ValueError(f"layouts must weight sparse / crowded / occluded (>= 0, some > 0), got {self.layouts}")
        if not 48 <= self.min_side <= self.max_side:
            raise ValueError(f"need 48 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        limit = 0.9 if self.layouts.get("occluded", 0) > 0 else 1.0  # occluded scenes must hide something
        if not 0 < self.min_visible_fraction <= limit:
            raise ValueError(f"min_visible_fraction must be in (0, {limit}], got {self.min_visible_fraction}")
        if self.num_samples < 0 or self.max_questions < 1 or self.max_aspect < 1:
            raise ValueError("num_samples must be >= 0, max_questions >= 1, max_aspect >= 1")


@dataclasses.dataclass
class VideoSourceConfig:
    """Real video files: one file or a folder of them, with a caption for all (else a `.txt` beside each)."""

    path: str
    name: str = ""
    caption: str = ""


VIDEO_TASKS = ("caption", "qa", "grounding")  # the video samples a clip gives; a real file gives a caption


@dataclasses.dataclass
class VideoConfig:
    """Video samples: synthetic clips with exact labels plus real files, sampled by the paper's rule."""

    enabled: bool = True
    synthetic_clips: int = 2000
    min_duration_s: float = 8.0
    max_duration_s: float = 30.0
    clip_fps: list[float] = dataclasses.field(default_factory=lambda: [2.0, 5.0, 10.0])
    clip_width: int = 320
    clip_height: int = 240
    max_objects: int = 3
    sources: list[VideoSourceConfig] = dataclasses.field(default_factory=list)
    sample_fps: float = 1.0  # the paper: 1 fps by default, up to 5 for motion-heavy tasks
    # Dynamic frame rate: fps per video task (caption, qa, grounding); a task not listed uses sample_fps.
    # Temporal grounding needs finer time steps; every rate stays within max_tokens per video.
    task_fps: dict[str, float] = dataclasses.field(default_factory=lambda: {"grounding": 2.0})
    min_frames: int = 16
    budgets: list[int] = dataclasses.field(default_factory=lambda: [640, 512, 384, 256, 160, 128])
    max_tokens: int = 81_920
    frame_quality: int = 90
    decode_timeout_s: float = 120.0
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.synthetic_clips < 0:
            raise ValueError("synthetic_clips must be >= 0")
        if not 0 < self.min_duration_s <= self.max_duration_s:
            raise ValueError(f"need 0 < min_duration_s <= max_duration_s, got {self.min_duration_s}, "
                             f"{self.max_duration_s}")
        if not 0 < self.sample_fps <= 5:
            raise ValueError(f"sample_fps must be in (0, 5] (the paper's range), got {self.sample_fps}")
        unknown = sorted(set(self.task_fps) - set(VIDEO_TASKS))
        if unknown:
            raise ValueError(f"task_fps names unknown video tasks {unknown}; the tasks are {list(VIDEO_TASKS)}")
        for task, fps in self.task_fps.items():
            if not 0 < fps <= 5:
                raise ValueError(f"task_fps.{task} must be in (0, 5] (the paper's range), got {fps}")
        if not self.clip_fps or min(self.clip_fps) <= 0:
            raise ValueError("clip_fps must list positive frame rates")
        if not self.budgets or sorted(self.budgets, reverse=True) != list(self.budgets) or min(self.budgets) < 1:
            raise ValueError(f"budgets must be positive tokens per frame in decreasing order, got {self.budgets}")
        if self.min_frames < 1 or self.max_tokens < self.budgets[-1]:
            raise ValueError(f"need min_frames >= 1 and max_tokens >= the smallest budget ({self.budgets[-1]}), "
                             f"got {self.min_frames}, {self.max_tokens}")
        if self.clip_width < 64 or self.clip_height < 48 or not 1 <= self.frame_quality <= 95:
            raise ValueError("need clip_width >= 64, clip_height >= 48 and frame_quality in [1, 95]")
        if self.decode_timeout_s <= 0 or not 1 <= self.max_objects <= 4:
            raise ValueError("need decode_timeout_s > 0 and max_objects in [1, 4]")

    def fps_for(self, task: str) -> float:
        """The frame rate video samples of this task are drawn at (task_fps, else sample_fps)."""
        if task not in VIDEO_TASKS:
            raise ValueError(f"unknown video task {task!r}; the tasks are {list(VIDEO_TASKS)}")
        return float(self.task_fps.get(task, self.sample_fps))


def check_captioner_fields(section: str, cfg: Any) -> None:
    """The captioner fields image_captions and video_captions share, checked at load (`section`: their key)."""
    if cfg.enabled and not cfg.model:
        raise ValueError(f"{section}.model is empty: name the captioner (models:/seedvl@latest-pipeline, "
                         "models:/seedvl/<version>, an exported VLM folder or a local transformers model folder), "
                         f"or set {section}.enabled=false")
    if cfg.model.startswith("models:") and not MODEL_URI.match(cfg.model):
        raise ValueError(f"{section}.model {cfg.model!r} is not a registry URI: write "
                         "models:/<name>@<alias> or models:/<name>/<version>")
    if cfg.max_new_tokens < 1 or cfg.min_words < 1 or not cfg.prompt.strip() or cfg.num_gpus < 0:
        raise ValueError(f"{section}: need max_new_tokens >= 1, min_words >= 1, a non-empty prompt and num_gpus >= 0")
    if cfg.generate_batch < 1:
        raise ValueError(f"{section}.generate_batch must be >= 1, got {cfg.generate_batch}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"{section}: need temperature >= 0 (0: greedy) and top_p in (0, 1], got "
                         f"{cfg.temperature} and {cfg.top_p}")


@dataclasses.dataclass
class CaptionerConfig:
    """The captioner fields image_captions and video_captions share, checked at load under `SECTION`."""

    SECTION: ClassVar[str] = ""
    enabled: bool = False
    # models:/<name>@<alias> or models:/<name>/<version> (our registry), an exported VLM folder, or a local
    # Hugging Face image-text-to-text model folder (AutoProcessor + AutoModelForImageTextToText; never downloaded)
    model: str = ""
    registry_uri: str = ""  # the MLflow store models:/ names are looked up in; '' = the pipeline's own (filled at load)
    replace_human: bool = False  # also caption what has a hand-written caption, and use the model's instead
    prompt: str = ""
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy; else sampled (top_p), seeded per request from run.seed and its key
    top_p: float = 1.0
    min_words: int = 2  # an answer with fewer words (letters only) is unparseable
    generate_batch: int = 16  # requests (images, or a video's windows) decoded together in one generation call
    num_gpus: float = 0.0  # per captioning actor; with a GPU the model runs there in bf16
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(num_cpus=1, concurrency=1,
                                                                                  batch_size=16))

    def __post_init__(self) -> None:
        check_captioner_fields(self.SECTION, self)


@dataclasses.dataclass
class ImageCaptionsConfig(CaptionerConfig):
    """Model-written captions for images (step `image_captions`, between `ingest` and `basic_filters`): an
    image whose caption is missing, not UTF-8, or poor by basic_filters' caption rules (with
    `replace_human`, every image basic_filters would keep) is described by the captioner, and the row is
    marked `caption_source: model:<model>`; every other row passes through as `human`. An answer
    basic_filters would drop is unparseable too."""

    SECTION: ClassVar[str] = "data.image_captions"
    prompt: str = "Describe this image in one sentence."


@dataclasses.dataclass
class ImageCaptionsJob:
    """What the `image_captions` step uses: its own section, basic_filters' rules (which captions are poor,
    which images it drops anyway, so are not captioned; its `resources` also size the step's column tasks)
    and ingest's image size guard (an image ingest did not open because its caption was not UTF-8 is opened
    here)."""

    captions: ImageCaptionsConfig
    filters: BasicFiltersConfig
    max_image_pixels: int


def image_captions_view(data: DataConfig) -> ImageCaptionsJob:
    return ImageCaptionsJob(captions=data.image_captions, filters=data.basic_filters,
                            max_image_pixels=data.ingest.max_image_pixels)


@dataclasses.dataclass
class VideoCaptionsConfig(CaptionerConfig):
    """Model-written dense, timestamped captions for real videos (step `video_captions`, after
    `video_samples`): a file without a hand-written caption (else dropped as `caption_missing`) is
    cut into `window_s` windows, the captioner describes each window's frames, and the segments become its
    caption sample and its temporal-grounding sample, marked `caption_source: model:<model>`. Sampling is
    seeded per window (run.seed, key and start); an unparseable segment answer is dropped."""

    SECTION: ClassVar[str] = "data.video_captions"
    prompt: str = "Describe what happens in these frames in one sentence."
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(num_cpus=1, concurrency=1,
                                                                                  batch_size=4))
    window_s: float = 4.0  # seconds of video per captioned segment
    max_frames_per_window: int = 8  # the window's frames (at data.video's caption rate), thinned evenly to this

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_s <= 0 or self.max_frames_per_window < 1:
            raise ValueError(f"data.video_captions: need window_s > 0 and max_frames_per_window >= 1, got "
                             f"{self.window_s} and {self.max_frames_per_window}")


@dataclasses.dataclass
class VideoCaptionsJob:
    """What the `video_captions` step uses: its own section, and `data.video`'s sampling rule (the frames it
    decodes for the captioner and for the samples it writes are sampled as video_samples samples them)."""

    captions: VideoCaptionsConfig
    video: VideoConfig


def video_captions_view(data: DataConfig) -> VideoCaptionsJob:
    return VideoCaptionsJob(captions=data.video_captions, video=data.video)


@dataclasses.dataclass
class ShardsConfig:
    """WebDataset shard writing."""

    samples_per_shard: int = 1000
    prefix: str = "shard"
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")


@dataclasses.dataclass
class DataConfig:
    synthetic_crawl: SyntheticCrawlConfig = dataclasses.field(default_factory=SyntheticCrawlConfig)
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    image_captions: ImageCaptionsConfig = dataclasses.field(default_factory=ImageCaptionsConfig)
    basic_filters: BasicFiltersConfig = dataclasses.field(default_factory=BasicFiltersConfig)
    clip_scorer: ClipScorerConfig = dataclasses.field(default_factory=ClipScorerConfig)
    clip_filter: ClipFilterConfig = dataclasses.field(default_factory=ClipFilterConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    rebalance: RebalanceConfig = dataclasses.field(default_factory=RebalanceConfig)
    ocr: OcrConfig = dataclasses.field(default_factory=OcrConfig)
    grounding: GroundingConfig = dataclasses.field(default_factory=GroundingConfig)
    video: VideoConfig = dataclasses.field(default_factory=VideoConfig)
    video_captions: VideoCaptionsConfig = dataclasses.field(default_factory=VideoCaptionsConfig)
    shards: ShardsConfig = dataclasses.field(default_factory=ShardsConfig)
