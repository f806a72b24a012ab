"""A synthetic 'web crawl' with labelled noise, written as img2dataset-format WebDataset shards.

Each clean sample is a scene of coloured shapes at a varied native resolution and aspect ratio,
with a caption that says what is drawn. A configured fraction of samples carries exactly one kind
of labelled noise (see `NOISE_KINDS`): a caption from another scene, an exact or near duplicate
(re-encoded, resized or slightly cropped) of an earlier image, a tiny or extreme-aspect image,
corrupt image bytes, an empty caption, or caption bytes that are not UTF-8. The label sits in each
sample's json under `synthetic` and in the shard's parquet, so every filter can be scored.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from components.common.contract import StageContext, StageResult, component
from components.data.config import NOISE_KINDS, SyntheticCrawlConfig

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 140, 20),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (150, 150, 150), "beige": (235, 225, 200), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass
class DrawnObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[DrawnObject] = field(default_factory=list)

    def caption(self) -> str:
        groups = Counter((o.colour, o.shape) for o in self.objects)
        parts = []
        for (colour, shape), n in sorted(groups.items()):
            noun = shape + ("s" if n > 1 else "")
            parts.append(f"{'a' if n == 1 else NUMBER_WORDS[n]} {colour} {noun}")
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{listed} on a {self.background} background"


def random_scene(rng: random.Random, width: int, height: int, colour_skew: float = 0.0) -> Scene:
    """Colours are uniform, or Zipf-skewed with exponent `colour_skew` over COLOURS' order (a long tail)."""
    background = rng.choice(list(BACKGROUNDS))
    scene = Scene(width, height, background)
    for _ in range(rng.randint(1, 4)):
        allowed = [c for c in COLOURS if c != background]
        if colour_skew > 0:
            ranks = [list(COLOURS).index(c) + 1 for c in allowed]
            colour = rng.choices(allowed, weights=[r ** -colour_skew for r in ranks])[0]
        else:
            colour = rng.choice(allowed)
        size = max(4, int(min(width, height) * rng.uniform(0.15, 0.35)))
        x0 = rng.randint(0, max(0, width - size))
        y0 = rng.randint(0, max(0, height - size))
        scene.objects.append(DrawnObject(rng.choice(SHAPES), colour, (x0, y0, x0 + size, y0 + size)))
    return scene


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return image


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def native_size(rng: random.Random, min_side: int, max_side: int, max_aspect: float,
                landscape_share: float = 0.5) -> tuple[int, int]:
    """A varied native resolution: shorter side >= min_side, longer side <= max_side, aspect up to
    max_aspect, landscape with probability landscape_share."""
    aspect = rng.uniform(1.0, max(1.0, min(max_aspect, max_side / min_side)))
    short = rng.randint(min_side, max(min_side, int(max_side / aspect)))
    long = max(short, min(max_side, round(short * aspect)))
    return (long, short) if rng.random() < landscape_share else (short, long)


def clean_size(rng: random.Random, cfg: SyntheticCrawlConfig) -> tuple[int, int]:
    return native_size(rng, cfg.min_side, cfg.max_side, cfg.max_clean_aspect, landscape_share=0.6)


def pick_noise(rng: random.Random, cfg: SyntheticCrawlConfig) -> str | None:
    draw = rng.random()
    for kind in NOISE_KINDS:
        rate = getattr(cfg.noise, kind)
        if draw < rate:
            return kind
        draw -= rate
    return None


@dataclass
class CrawlSample:
    key: str
    image: bytes
    ext: str
    caption: bytes
    noise: str | None
    duplicate_of: str | None
    scene: Scene | None
    transform: str | None = None

    def label(self) -> dict[str, Any]:
        return {
            "noise": self.noise,
            "duplicate_of": self.duplicate_of,
            "transform": self.transform,
            "objects": [asdict(o) for o in self.scene.objects] if self.scene else [],
            "true_caption": self.scene.caption() if self.scene else None,
        }


def generate_shard(cfg: SyntheticCrawlConfig, shard: int, count: int, seed: int) -> list[CrawlSample]:
    """Generate one shard's samples; the same (config, shard, seed) always gives the same bytes."""
    rng = random.Random(f"{seed}-{shard}")
    digits = max(4, len(str(count)))
    clean: list[CrawlSample] = []
    samples: list[CrawlSample] = []
    for index in range(count):
        key = f"{shard:05d}{index:0{digits}d}"
        noise = pick_noise(rng, cfg)
        if noise in ("exact_duplicate", "near_duplicate") and not clean:
            noise = None  # nothing to duplicate yet
        sample = _make_sample(rng, cfg, key, noise, clean)
        samples.append(sample)
        if noise is None:
            clean.append(sample)
    return samples


def _make_sample(
    rng: random.Random, cfg: SyntheticCrawlConfig, key: str, noise: str | None, clean: list[CrawlSample]
) -> CrawlSample:
    fmt = "png" if rng.random() < 0.15 else "jpg"
    if noise in ("exact_duplicate", "near_duplicate"):
        original = rng.choice(clean)
        if noise == "exact_duplicate":
            return CrawlSample(key, original.image, original.ext, original.caption, noise, original.key, original.scene)
        image, transform = near_duplicate(rng, original, cfg.min_side, cfg.jpeg_quality)
        return CrawlSample(key, image, "jpg", original.caption, noise, original.key, original.scene, transform)
    if noise == "tiny_image":
        width, height = rng.randint(16, min(150, cfg.min_side - 1)), rng.randint(16, cfg.max_side)
        width, height = (width, height) if rng.random() < 0.5 else (height, width)
    elif noise == "extreme_aspect":
        short = rng.randint(cfg.min_side, cfg.min_side + 40)
        long = round(short * rng.uniform(3.5, 8.0))
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
    else:
        width, height = clean_size(rng, cfg)
    scene = random_scene(rng, width, height, cfg.colour_skew)
    image = encode(render(scene), fmt, cfg.jpeg_quality)
    caption = scene.caption().encode()
    if noise == "mismatched_caption":
        other = random_scene(rng, width, height)
        while other.caption() == scene.caption():
            other = random_scene(rng, width, height)
        caption = other.caption().encode()
    elif noise == "corrupt_image":
        image = corrupt(rng, image)
    elif noise == "empty_caption":
        caption = rng.choice([b"", b"   ", b"\n"])
    elif noise == "non_utf8_caption":
        caption = rng.choice([b"caf\xe9 ", b"\xff\xfe", b"na\xefve "]) + caption
    return CrawlSample(key, image, fmt, caption, noise, None, scene)


def near_duplicate(rng: random.Random, original: CrawlSample, min_side: int, quality: int) -> tuple[bytes, str]:
    """Re-encode, resize or slightly crop an earlier image; its shorter side stays >= min_side."""
    image = Image.open(io.BytesIO(original.image)).convert("RGB")
    transform = rng.choice(["reencode", "resize", "crop"])
    if transform == "resize":
        scale = rng.choice([rng.uniform(0.7, 0.95), rng.uniform(1.05, 1.4)])
        scale = max(scale, min_side / min(image.size))
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    elif transform == "crop":
        dx, dy = round(image.width * rng.uniform(0.02, 0.06)), round(image.height * rng.uniform(0.02, 0.06))
        if min(image.width - 2 * dx, image.height - 2 * dy) < min_side:
            dx = dy = 0
            transform = "reencode"
        image = image.crop((dx, dy, image.width - dx, image.height - dy))
    return encode(image, "jpg", rng.randint(max(40, quality - 35), quality - 5)), transform


def corrupt(rng: random.Random, encoded: bytes) -> bytes:
    how = rng.choice(["truncate", "garbage", "header"])
    if how == "truncate":
        return encoded[: max(16, int(len(encoded) * rng.uniform(0.2, 0.7)))]
    if how == "garbage":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(64, 2048)))
    return b"\x00" * 32 + encoded[32:]


def write_img2dataset_shard(folder: Path, shard: int, samples: list[CrawlSample]) -> dict[str, Any]:
    """`{shard:05d}.tar` (jpg/png + txt + json per key), `.parquet` labels and `_stats.json`."""
    name = f"{shard:05d}"
    tmp = folder / f".{name}.tar.tmp"
    with tarfile.open(tmp, "w") as tar:
        for sample in samples:
            meta = {"key": sample.key, "status": "success", "synthetic": sample.label()}
            if sample.scene is not None and sample.noise != "corrupt_image":
                meta["width"], meta["height"] = _size_of(sample)
            _add_member(tar, f"{sample.key}.{sample.ext}", sample.image)
            _add_member(tar, f"{sample.key}.txt", sample.caption)
            _add_member(tar, f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode())
    tmp.replace(folder / f"{name}.tar")
    labels = pa.Table.from_pylist(
        [
            {"key": s.key, "noise": s.noise, "duplicate_of": s.duplicate_of, "transform": s.transform,
             "caption": s.caption.decode("utf-8", errors="replace")}
            for s in samples
        ],
        schema=pa.schema([("key", pa.string()), ("noise", pa.string()), ("duplicate_of", pa.string()),
                          ("transform", pa.string()), ("caption", pa.string())]),
    )
    pq.write_table(labels, folder / f".{name}.parquet.tmp")
    (folder / f".{name}.parquet.tmp").replace(folder / f"{name}.parquet")
    noise_counts = Counter(s.noise or "clean" for s in samples)
    stats = {"shard": name, "samples": len(samples), "noise": dict(sorted(noise_counts.items()))}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    return stats


def _size_of(sample: CrawlSample) -> tuple[int, int]:
    with Image.open(io.BytesIO(sample.image)) as image:
        return image.size


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # deterministic archives: same config, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def shard_sizes(total: int, shards: int) -> list[int]:
    base, extra = divmod(total, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def generate_shards(batch: dict[str, Any], cfg: SyntheticCrawlConfig, folder: str, seed: int) -> dict[str, Any]:
    """Ray Data UDF: shard indices in, those shards written to `folder`, their stats rows out."""
    sizes = shard_sizes(cfg.num_samples, cfg.num_shards)
    rows = []
    for shard in batch["id"].tolist():
        samples = generate_shard(cfg, shard, sizes[shard], seed)
        rows.append(json.dumps(write_img2dataset_shard(Path(folder), shard, samples)))
    return {"stats": rows}


@component(name="synthetic_crawl", version="1", config="data.synthetic_crawl", outputs=("shards",))
def synthetic_crawl(ctx: StageContext[SyntheticCrawlConfig]) -> StageResult:
    import ray.data

    cfg = ctx.config
    folder = ctx.outputs["shards"]
    folder.mkdir(parents=True, exist_ok=True)
    shard_ids = ray.data.range(cfg.num_shards, override_num_blocks=cfg.num_shards)
    stats_rows = shard_ids.map_batches(
        generate_shards, fn_kwargs={"cfg": cfg, "folder": str(folder), "seed": ctx.seed}, batch_size=1,
        **cfg.resources.map_kwargs(),
    ).take_all()
    totals = Counter[str]()
    for row in stats_rows:
        totals.update(json.loads(row["stats"])["noise"])
    summary = {"samples": sum(totals.values()), "shards": cfg.num_shards, "noise": dict(sorted(totals.items()))}
    (ctx.workdir / "crawl_stats.json").write_text(json.dumps(summary, indent=1))
    metrics = {"samples": float(summary["samples"])} | {f"noise.{k}": float(v) for k, v in totals.items()}
    return StageResult(metrics=metrics, artifacts=["crawl_stats.json"])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(synthetic_crawl))
