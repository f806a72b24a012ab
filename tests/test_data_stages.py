"""The data stages on Ray Data: synthetic crawl labels, ingest, basic filters and shards that read back."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import imagehash
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.common.executor import run_into
from components.data.basic_filters import basic_filters, drop_reason
from components.data.config import (BasicFiltersConfig, IngestConfig, NoiseRates, ShardsConfig, SourceConfig,
                                    SyntheticCrawlConfig)
from components.data.ingest import ingest
from components.data.write_shards import list_shards, write_shards
from components.data.synthetic_crawl import generate_shard, synthetic_crawl
from components.data.lib.table import read_stats

CRAWL = SyntheticCrawlConfig(num_samples=240, num_shards=3, max_side=320, noise=NoiseRates(
    mismatched_caption=0.1, exact_duplicate=0.06, near_duplicate=0.1, tiny_image=0.05, extreme_aspect=0.05,
    corrupt_image=0.05, empty_caption=0.05, non_utf8_caption=0.05))


def test_drop_reasons_follow_datacomp_defaults() -> None:
    cfg = BasicFiltersConfig()
    assert drop_reason(300, 300, "a red circle here", cfg) is None
    assert drop_reason(199, 300, "a red circle here", cfg) == "image_too_small"
    assert drop_reason(200, 601, "a red circle here", cfg) == "aspect_ratio_too_extreme"
    assert drop_reason(200, 600, "a red circle here", cfg) is None  # exactly 3:1 is allowed
    assert drop_reason(300, 300, "", cfg) == "caption_missing"
    assert drop_reason(300, 300, "two words", cfg) == "caption_too_few_words"
    assert drop_reason(300, 300, "a b c", cfg) == "caption_too_short"  # 3 words, 5 characters
    assert drop_reason(300, 300, "a b cd", cfg) is None


def test_crawl_shards_are_deterministic() -> None:
    first = generate_shard(CRAWL, 1, 40, seed=7)
    again = generate_shard(CRAWL, 1, 40, seed=7)
    other = generate_shard(CRAWL, 1, 40, seed=8)
    assert [s.image for s in first] == [s.image for s in again]
    assert [s.image for s in first] != [s.image for s in other]


@pytest.fixture(scope="module")
def crawl(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    staged = tmp_path_factory.mktemp("crawl")
    run_into(synthetic_crawl, CRAWL, {}, staged, seed=3)
    return staged / "shards"


def _crawl_samples(folder: Path) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_crawl_labels_match_what_was_drawn(crawl: Path) -> None:
    samples = _crawl_samples(crawl)
    assert len(samples) == CRAWL.num_samples
    labels = pq.read_table(sorted(crawl.glob("*.parquet"))).to_pylist()
    noise = Counter(label["noise"] for label in labels)
    assert all(noise[kind] > 0 for kind in dataclasses.asdict(CRAWL.noise))  # every kind present
    for label in labels:
        sample = samples[label["key"]]
        meta = json.loads(sample["json"])["synthetic"]
        assert meta["noise"] == label["noise"]
        image_bytes = sample.get("jpg") or sample.get("png")
        kind = label["noise"]
        if kind == "corrupt_image":
            with pytest.raises(Exception):
                Image.open(io.BytesIO(image_bytes)).load()
            continue
        image = Image.open(io.BytesIO(image_bytes))
        short, long = sorted(image.size)
        if kind == "tiny_image":
            assert short < 200
        elif kind == "extreme_aspect":
            assert long / short > 3
        else:
            assert short >= CRAWL.min_side and long / short <= 3
        caption = sample["txt"]
        if kind == "empty_caption":
            assert caption.strip() == b""
        elif kind == "non_utf8_caption":
            with pytest.raises(UnicodeDecodeError):
                caption.decode("utf-8")
        elif kind == "mismatched_caption":
            assert caption.decode() != meta["true_caption"]
        else:
            assert caption.decode() == meta["true_caption"]
        if kind == "exact_duplicate":
            original = samples[label["duplicate_of"]]
            assert image_bytes == (original.get("jpg") or original.get("png"))
        if kind == "near_duplicate":
            original = samples[label["duplicate_of"]]
            original_image = Image.open(io.BytesIO(original.get("jpg") or original.get("png")))
            assert image_bytes != (original.get("jpg") or original.get("png"))
            assert imagehash.phash(image) - imagehash.phash(original_image) <= 10


@pytest.fixture(scope="module")
def curated(crawl: Path, real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ingest (crawl + the real files) -> basic filters -> shards, each into its own folder."""
    sources = [
        SourceConfig("webdataset", str(real_data / "img2dataset_shard_00000.tar"), name="nemo"),
        SourceConfig("webdataset", str(real_data / "sample.tgz"), name="wds"),
        SourceConfig("folder", str(real_data / "odd_aspect_jpegs"), name="odd"),
    ]
    out: dict[str, Path] = {}
    staged = tmp_path_factory.mktemp("ingest")
    run_into(ingest, IngestConfig(sources=sources), {"crawl": crawl}, staged, seed=0)
    out["ingest"] = staged / "samples"
    staged = tmp_path_factory.mktemp("filters")
    run_into(basic_filters, BasicFiltersConfig(), {"samples": out["ingest"]}, staged, seed=0)
    out["filters"] = staged / "samples"
    for name in ("shards", "shards_again"):
        staged = tmp_path_factory.mktemp(name)
        run_into(write_shards, ShardsConfig(samples_per_shard=64), {"samples": out["filters"]}, staged, seed=0)
        out[name] = staged / "shards"
    return out


def test_ingest_counts_every_record(curated: dict[str, Path], crawl: Path) -> None:
    stats = read_stats(curated["ingest"])
    labels = Counter(r["noise"] for r in pq.read_table(sorted(crawl.glob("*.parquet"))).to_pylist())
    assert stats["in"] == CRAWL.num_samples + 1 + 90 + 7
    assert stats["dropped"] == {"caption_not_utf8": labels["non_utf8_caption"], "image_corrupt": labels["corrupt_image"]}
    assert stats["in"] == stats["kept"] + sum(stats["dropped"].values())


def test_basic_filters_drop_exactly_the_labelled_noise(curated: dict[str, Path], crawl: Path) -> None:
    stats = read_stats(curated["filters"])
    labels = Counter(r["noise"] for r in pq.read_table(sorted(crawl.glob("*.parquet"))).to_pylist())
    # Real files: the 90 PNGs of sample.tgz are tiny; of the 7 odd-aspect JPEGs (named WIDTH_HEIGHT),
    # 123x456 and 456x123 are under 200 px, the other 5 (aspect <= 2.4) have no caption.
    assert stats["dropped"] == {
        "image_too_small": labels["tiny_image"] + 90 + 2,
        "aspect_ratio_too_extreme": labels["extreme_aspect"],
        "caption_missing": labels["empty_caption"] + 5,
    }
    assert stats["kept"] == labels[None] + labels["mismatched_caption"] + labels["exact_duplicate"] \
        + labels["near_duplicate"] + 1  # + the img2dataset pair
    cumulative = stats["cumulative"]
    assert cumulative["in"] == cumulative["kept"] + sum(cumulative["dropped"].values())


def test_shards_read_back_and_are_deterministic(curated: dict[str, Path], local_ray: None) -> None:
    import ray.data
    import webdataset as wds

    shards = list_shards(curated["shards"])
    job = json.loads((curated["shards"] / "stats.json").read_text())
    assert [str(p.relative_to(curated["shards"])) for p in shards] == sorted(job["per_shard"])
    assert [p.parent.name for p in shards] == ["caption"] * len(shards)
    assert job["kept"] == read_stats(curated["filters"])["cumulative"]["kept"]
    assert job["in"] == job["kept"] + sum(job["dropped"].values())
    per_shard = [json.loads(p.with_suffix(".stats.json").read_text()) for p in shards]
    assert sum(s["samples"] for s in per_shard) == job["kept"]

    dataset = wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil")
    seen = []
    for sample in dataset:
        image = sample.get("jpg") or sample.get("png")
        assert sample["txt"] == sample["json"]["caption"] and sample["json"]["task"] == "caption"
        assert image.size == (sample["json"]["width"], sample["json"]["height"])
        seen.append(sample["__key__"])
    assert len(seen) == len(set(seen)) == job["kept"]

    # Images keep their own format (jpg or png), so Ray reads raw bytes (its default decoder needs one type).
    rows = ray.data.read_webdataset([str(p) for p in shards], decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(seen)
    assert all(isinstance(r["jpg"], bytes) or isinstance(r["png"], bytes) for r in rows)

    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in shards]
    again = [hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(curated["shards_again"])]
    assert digest == again
