"""Model-written image captions: which ingest rows are captioned, what becomes of an answer (the model's
caption, the human one kept, or the image dropped as `caption_empty`), the config's and the loader's errors,
our exported VLM asked about still images, and the step on Ray Data between ingest and basic_filters with a
tiny transformers LLaVA: captions reach basic_filters' kept rows and the shard json with `caption_source`,
`replace_human` replaces good captions, and failed answers keep the human caption or drop the image."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.common.executor import run_into
from components.data.config import BasicFiltersConfig, ImageCaptionsConfig, ImageCaptionsJob, ShardsConfig
from components.data.image_captions import (PENDING_SCHEMA, assemble, captioner_preflight, image_captions,
                                            wants_model_caption)
from components.data.lib.captioner import load_captioner
from components.data.lib.table import SAMPLE_SCHEMA, data_dir, read_stats, write_stats
from vlm_exports import TINY_LLAVA_WORDS, make_tiny_llava, write_random_export

GOOD = "a red circle on a white background"


def job(**captions: object) -> ImageCaptionsJob:
    return ImageCaptionsJob(ImageCaptionsConfig(**{"enabled": True, "model": "/m", **captions}),
                            BasicFiltersConfig(min_short_side=200), max_image_pixels=10_000_000)


def jpeg(side: int = 256, shade: int = 40) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (shade, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def row(key: str, caption: str | None, drop: str | None = None, side: int | None = 256,
        image: bytes | None = None) -> dict:
    return {"key": key, "image": image if image is not None else jpeg(side or 256), "image_ext": "jpg",
            "caption": caption, "width": side, "height": side, "source": "t", "meta": json.dumps({"i": key}),
            "drop_reason": drop}


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def test_which_rows_are_captioned() -> None:
    rows = [row("good", GOOD), row("none", None), row("empty", ""), row("few_words", "red circle"),
            row("few_chars", "a b c"), row("not_text", None, drop="caption_not_utf8", side=None),
            row("corrupt", None, drop="image_corrupt"), row("tiny", None, side=64)]
    wanted = {r["key"] for r in rows if wants_model_caption(r, job())}
    assert wanted == {"none", "empty", "few_words", "few_chars", "not_text"}  # tiny: basic_filters drops it anyway
    assert {r["key"] for r in rows if wants_model_caption(r, job(replace_human=True))} == wanted | {"good"}


def pending(key: str, caption: str | None, answer: str | None, ask: bool = True, drop: str | None = None) -> dict:
    return {**row(key, caption, drop), "ask": ask, "answer": answer, "caption_s": 0.1}


def test_an_answer_becomes_the_caption_or_keeps_the_human_one_or_drops_the_image() -> None:
    batch = pa.Table.from_pylist([
        pending("new", None, "<think>hm</think> a blue square on grey"), pending("better", "red circle", GOOD),
        pending("kept", "red circle", "\n\n"), pending("kept_short", "red circle", "a square"),
        pending("empty", "", ""), pending("unreadable", None, None, ask=False, drop="image_corrupt"),
        pending("small", None, None, ask=False)], schema=PENDING_SCHEMA)
    rows = {r["key"]: r for r in assemble(batch, "models:/seedvl/3", job()).to_pylist()}
    assert rows["new"]["caption"] == "a blue square on grey" and rows["new"]["caption_source"] == "model:models:/seedvl/3"
    assert "human_caption" not in json.loads(rows["new"]["meta"])
    assert rows["better"]["caption"] == GOOD and json.loads(rows["better"]["meta"])["human_caption"] == "red circle"
    for key in ("kept", "kept_short"):  # an answer basic_filters would drop never replaces a human caption
        assert rows[key]["caption"] == "red circle" and rows[key]["caption_source"] == "human"
        assert rows[key]["drop_reason"] is None
    assert rows["empty"]["drop_reason"] == "caption_empty" and rows["empty"]["caption_source"] is None
    assert rows["unreadable"]["drop_reason"] == "image_corrupt" and rows["small"]["drop_reason"] is None
    assert set(rows["new"]) == set(SAMPLE_SCHEMA.names) | {"caption_source"}


def test_config_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    from components.common.config import ConfigError
    from components.schema import load_config

    with pytest.raises((ConfigError, ValueError), match="data.image_captions.model is empty"):
        load_config("tiny", overrides=["data.image_captions.enabled=true"])
    with pytest.raises(ValueError, match="models:/<name>@<alias>"):
        ImageCaptionsConfig(enabled=True, model="models:/seedvl")
    with pytest.raises(ValueError, match="temperature >= 0"):
        ImageCaptionsConfig(temperature=-1)
    config, _ = load_config("tiny", overrides=["data.image_captions.enabled=true",
                                               "data.image_captions.model=models:/seedvl@latest-pipeline"])
    assert config.data.image_captions.registry_uri == config.tracking_uri  # the pipeline's own registry
    assert not load_config("tiny")[0].data.image_captions.enabled  # off by default
    (tmp_path / "notes.txt").write_text("not a model")
    assert captioner_preflight(job(model=str(tmp_path))).startswith(f"data.image_captions.model: {tmp_path} is not a "
                                                                    "model folder")
    missing = job(model="models:/seedvl@latest-pipeline", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "not in the model registry" in captioner_preflight(missing)


def test_our_exported_vlm_captions_still_images(tmp_path: Path) -> None:
    folder = write_random_export(tmp_path / "export")
    captioner = load_captioner(folder, ImageCaptionsConfig(max_new_tokens=4))
    answers = captioner.caption([([jpeg(64, 10)], []), ([jpeg(96, 200)], [])], [1, 2])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    sampled = load_captioner(folder, ImageCaptionsConfig(max_new_tokens=4, temperature=1.0))
    assert sampled.caption([([jpeg(64, 10)], [])], [5]) == sampled.caption([([jpeg(64, 10)], [])], [5])  # seeded


def ingest_table(folder: Path) -> Path:
    rows = [row("good", GOOD), row("none", None), row("empty", ""), row("poor", "red circle"),
            row("not_text", None, drop="caption_not_utf8", side=None),
            row("not_text_corrupt", None, drop="caption_not_utf8", side=None, image=b"\xff\xd8broken"),
            row("corrupt", None, drop="image_corrupt", image=b"x"), row("tiny", None, side=64)]
    data_dir(folder).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), data_dir(folder) / "part.parquet")
    write_stats(folder, "ingest", upstream=None)
    return folder


def table_rows(table: Path) -> dict[str, dict]:
    return {r["key"]: r for f in sorted(data_dir(table).glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_the_step_captions_images_into_basic_filters_and_the_shards(tmp_path: Path, tiny_llava: Path,
                                                                    local_ray: None) -> None:
    from components.data.basic_filters import basic_filters
    from components.data.write_shards import list_shards, write_shards

    ingest = ingest_table(tmp_path / "ingest")
    source = f"model:{tiny_llava.resolve()}"
    # replace_human: every image basic_filters keeps is captioned, the good human caption too
    result, _ = run_into(image_captions, job(model=str(tiny_llava), max_new_tokens=6, min_words=1, replace_human=True),
                         {"samples": ingest}, tmp_path / "captions", seed=0)
    table = tmp_path / "captions" / "samples"
    rows = table_rows(table)
    assert set(rows) == {"good", "none", "empty", "poor", "not_text", "not_text_corrupt", "corrupt", "tiny"}
    captioned = {k for k, r in rows.items() if r["caption_source"] == source}
    assert captioned == {"good", "none", "empty", "poor", "not_text"}
    assert all(set(rows[k]["caption"].split()) <= set(TINY_LLAVA_WORDS) for k in captioned)
    assert json.loads(rows["good"]["meta"])["human_caption"] == GOOD
    assert rows["not_text"]["width"] == 256 and rows["not_text"]["drop_reason"] is None  # opened here
    assert rows["not_text_corrupt"]["drop_reason"] == "image_corrupt" and rows["corrupt"]["drop_reason"] == "image_corrupt"
    assert rows["tiny"]["drop_reason"] is None and rows["tiny"]["caption_source"] is None  # basic_filters drops it
    assert result.metrics["images_in"] == 6 and result.metrics["images_asked"] == 5
    assert result.metrics["captioned"] == 5 and result.metrics["human_kept"] == result.metrics["caption_empty"] == 0
    assert result.metrics["rows_in"] == result.metrics["rows_kept"] + sum(
        v for k, v in result.metrics.items() if k.startswith("dropped."))
    stats = read_stats(table)
    assert stats["in"] == 8 and stats["kept"] == 6 and stats["dropped"] == {"image_corrupt": 2}
    report = json.loads((table / "captions.json").read_text())
    assert report["captioner"] == str(tiny_llava.resolve()) and len(report["images"]) == 5

    run_into(basic_filters, BasicFiltersConfig(min_short_side=200), {"samples": table}, tmp_path / "filtered", seed=0)
    filtered = tmp_path / "filtered" / "samples"
    kept = {k: r for k, r in table_rows(filtered).items() if r["drop_reason"] is None}
    assert set(kept) == captioned and {r["caption_source"] for r in kept.values()} == {source}
    assert read_stats(filtered)["cumulative"]["in"] == 8
    run_into(write_shards, ShardsConfig(samples_per_shard=100), {"samples": filtered}, tmp_path / "shards", seed=0)
    members = {}
    for shard in list_shards(tmp_path / "shards" / "shards", "caption"):
        with tarfile.open(shard) as tar:
            members |= {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    assert {m["caption_source"] for m in members.values()} == {source} and len(members) == 5
    assert "caption_source" not in members["none.json"]["scores"]
