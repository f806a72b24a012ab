"""Tests of the VLM's data side (components/vlm/data.py) on samples and shards built inside each test:
the held-out split key, decoding with drops counted by reason, video frame selection, the image token
count, the weighted task mix (held-out samples kept out, exact resume) and the text corpus."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from components.data.write_shards import sample_json, write_tar
from components.vit.config import SeedViTConfig
from components.vit.preprocess import image_to_patches
from components.training.shards import DropCounter, RawSample, ShardStream, is_held_out, read_shard, task_shards
from components.vlm.data import (
    MixedStream,
    VlmSample,
    corpus_texts,
    decode_sample,
    held_out_samples,
    image_token_count,
    select_frames,
    vlm_split_key,
)

FRACTION = 0.3


def jpeg(level: int, size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (level, 255 - level, (3 * level) % 256)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def png(level: int, size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (level, level, level)).save(buffer, "PNG")
    return buffer.getvalue()


def info_json(task: str, key: str, caption: str | None = None, conversations: list[dict[str, str]] | None = None,
              repeat_of: str | None = None, annotations: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"key": key, "task": task, "caption": caption, "conversations": conversations or [],
                       "annotations": annotations or {}, "repeat_of": repeat_of}).encode()


def qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def raw(key: str, task: str, image: bytes | None = None, frames: list[bytes] | None = None,
        **info: Any) -> RawSample:
    members: dict[str, bytes] = {"json": info_json(task, key, **info)}
    if image is not None:
        members["jpg"] = image
    for index, frame in enumerate(frames or []):
        members[f"frame{index:04d}.jpg"] = frame
    return RawSample(key=key, members=members)


# ---------------------------------------------------------------------------------------------------
# vlm_split_key
# ---------------------------------------------------------------------------------------------------


def test_caption_samples_split_by_their_originals_key() -> None:
    original = raw("cap7", "caption", jpeg(10), caption="a red circle")
    copy = raw("cap7_r1", "caption", jpeg(10), caption="a red circle", repeat_of="cap7")
    same_picture = raw("cap8", "caption", jpeg(10), caption="a red circle")
    assert vlm_split_key(original, "caption") == vlm_split_key(copy, "caption") == "cap7"
    assert vlm_split_key(same_picture, "caption") == "cap8"  # the ViT's rule: by key, not by picture


def test_other_tasks_split_by_their_first_images_bytes() -> None:
    picture, other_picture = jpeg(20), jpeg(21)
    grounding = raw("g1", "grounding", picture, conversations=qa("<image>\nWhere is it?", "<box>[1, 2, 3, 4]</box>"))
    counting = raw("c9", "counting", picture, conversations=qa("<image>\nHow many?", "2"))
    elsewhere = raw("c10", "counting", other_picture, conversations=qa("<image>\nHow many?", "2"))
    assert vlm_split_key(grounding, "grounding") == vlm_split_key(counting, "counting") == \
        "media:" + hashlib.sha1(picture).hexdigest()
    assert vlm_split_key(elsewhere, "counting") != vlm_split_key(counting, "counting")
    as_png = RawSample("o1", {"json": info_json("ocr", "o1", conversations=qa("Read it.", "x")), "png": png(5)})
    assert vlm_split_key(as_png, "ocr") == "media:" + hashlib.sha1(png(5)).hexdigest()
    bare = RawSample("o2", {"json": info_json("ocr", "o2", conversations=qa("Read it.", "x"))})
    assert vlm_split_key(bare, "ocr") == "o2"


def test_video_samples_split_by_their_first_frame() -> None:
    frames = [jpeg(level) for level in range(30, 42)]
    clip = raw("v1", "video", frames=frames, caption="a clip")
    # members stored in reverse order, and other later frames: still the same first frame
    reversed_members = RawSample("v2", dict(reversed(list(raw("v2", "video", frames=frames[:1] + frames[5:],
                                                              caption="x").members.items()))))
    other_start = raw("v3", "video", frames=[jpeg(99)] + frames[1:], caption="a clip")
    expected = "media:" + hashlib.sha1(frames[0]).hexdigest()
    assert vlm_split_key(clip, "video") == vlm_split_key(reversed_members, "video") == expected
    assert vlm_split_key(other_start, "video") != expected


def test_held_out_decision_is_a_stable_hash() -> None:
    picture = jpeg(50)
    samples = [raw(f"o{i}", "ocr", picture, conversations=qa("Read it.", "x")) for i in range(3)]
    keys = {vlm_split_key(sample, "ocr") for sample in samples}
    assert len(keys) == 1
    (key,) = keys
    digest = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")  # independent of process and run
    for fraction in (0.05, 0.3, 0.5, 0.9):
        assert is_held_out(key, fraction) == (digest / 2**64 < fraction)
    pictures = [jpeg(level) for level in range(200)]
    held = [is_held_out(vlm_split_key(raw(f"k{i}", "ocr", p, conversations=qa("q", "a")), "ocr"), FRACTION)
            for i, p in enumerate(pictures)]
    assert held == [is_held_out("media:" + hashlib.sha1(p).hexdigest(), FRACTION) for p in pictures]
    assert 0.15 < sum(held) / len(held) < 0.45


# ---------------------------------------------------------------------------------------------------
# decode_sample
# ---------------------------------------------------------------------------------------------------


def test_decode_sample_drops_and_counts_by_reason() -> None:
    good_ocr = info_json("ocr", "ok", conversations=qa("<image>\nRead the text.", "HELLO"))
    cases = {
        "bad_json": RawSample("b1", {"jpg": jpeg(1), "json": b"{not json"}),
        "bad_json_list": RawSample("b2", {"jpg": jpeg(1), "json": b"[1, 2]"}),
        "bad_json_bytes": RawSample("b3", {"jpg": jpeg(1), "json": b"\xff\xfe\xfa"}),
        "no_text": raw("n1", "ocr", jpeg(1), caption=None, conversations=[]),
        "no_text_empty": raw("n2", "caption", jpeg(1), caption=""),
        "no_text_no_json": RawSample("n3", {"jpg": jpeg(1)}),
        "missing_image": RawSample("m1", {"json": good_ocr, "txt": b"HELLO"}),
        "corrupt_image": RawSample("c1", {"json": good_ocr, "jpg": jpeg(1)[:40]}),
        "corrupt_frame": raw("c2", "video", frames=[jpeg(1), b"\x00" * 300, jpeg(3)], caption="a clip"),
    }
    counter = DropCounter()
    for raw_sample in cases.values():
        assert decode_sample(raw_sample, "ocr", counter) is None
    assert counter == {"bad_json": 3, "no_text": 3, "missing_image": 1, "corrupt_image": 2}

    kept = decode_sample(RawSample("ok", {"json": good_ocr, "jpg": jpeg(7, (20, 12))}), "ocr", counter)
    assert kept is not None and kept.key == "ok" and kept.task == "ocr"
    assert kept.info["conversations"][1]["value"] == "HELLO"
    assert [image.size for image in kept.images] == [(20, 12)] and kept.images[0].mode == "RGB"
    assert counter == {"bad_json": 3, "no_text": 3, "missing_image": 1, "corrupt_image": 2}  # nothing more
    caption_only = decode_sample(raw("cap", "caption", png(3), caption="a gray square"), "caption", counter)
    assert caption_only is not None and caption_only.images[0].mode == "RGB"
    # the json's task wins over the folder's name; the folder's when the json has none
    untyped = RawSample("u", {"json": json.dumps({"caption": "x"}).encode(), "jpg": jpeg(2)})
    decoded = decode_sample(untyped, "grounding", DropCounter())
    assert decoded is not None and decoded.task == "grounding"


def test_decode_sample_returns_video_frames_in_frame_order(tmp_path: Path) -> None:
    levels = [10 + 20 * i for i in range(12)]  # frame0010 and frame0011 must come after frame0009
    shard = tmp_path / "video" / "shard-000000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        members = [(f"clip.frame{i:04d}.jpg", jpeg(level)) for i, level in enumerate(levels)][::-1]
        members.append(("clip.json", info_json("video", "clip", caption="a clip",
                                               annotations={"timestamps": [0.5 * i for i in range(12)]})))
        for name, payload in members:
            entry = tarfile.TarInfo(name)
            entry.size = len(payload)
            tar.addfile(entry, io.BytesIO(payload))
    counter = DropCounter()
    (raw_sample,) = read_shard(shard, counter)
    sample = decode_sample(raw_sample, "video", counter)
    assert sample is not None and sample.task == "video" and len(sample.images) == 12
    assert [image.getpixel((8, 8))[0] for image in sample.images] == pytest.approx(levels, abs=3)
    assert sample.frame_timestamps() == [0.5 * i for i in range(12)]
    assert counter == DropCounter()


# ---------------------------------------------------------------------------------------------------
# select_frames
# ---------------------------------------------------------------------------------------------------


def video(count: int, annotations: Any = None, task: str = "video") -> VlmSample:
    images = [Image.new("RGB", (8, 8), (i, i, i)) for i in range(count)]
    info: dict[str, Any] = {"task": task, "caption": "a clip"}
    if annotations is not None:
        info["annotations"] = annotations
    return VlmSample(key="v", task=task, info=info, images=images)


def test_select_frames_evenly_with_their_timestamps() -> None:
    sample = video(10, {"timestamps": [0.4 + i for i in range(10)]})
    frames, stamps = select_frames(sample, 4)
    assert frames == [sample.images[i] for i in (0, 3, 6, 9)]
    assert stamps == pytest.approx([0.4, 3.4, 6.4, 9.4])
    frames, stamps = select_frames(sample, 3)  # first, middle (rounded), last
    assert [sample.images.index(f) for f in frames] in ([0, 4, 9], [0, 5, 9])
    assert stamps == pytest.approx([0.4 + sample.images.index(f) for f in frames])
    frames, stamps = select_frames(sample, 1)
    assert frames == [sample.images[0]] and stamps == pytest.approx([0.4])
    frames, stamps = select_frames(sample, 16)  # fewer frames than asked: all of them
    assert frames == sample.images and stamps == pytest.approx([0.4 + i for i in range(10)])
    frames, stamps = select_frames(sample, 10)
    assert frames == sample.images and len(stamps) == 10


@pytest.mark.parametrize("annotations", [None, {}, {"timestamps": [0.5, 1.5]}, {"timestamps": "soon"},
                                         ["not", "a", "dict"]])
def test_select_frames_falls_back_to_one_frame_per_second(annotations: Any) -> None:
    sample = video(6, annotations)
    frames, stamps = select_frames(sample, 3)
    chosen = [sample.images.index(f) for f in frames]
    assert chosen[0] == 0 and chosen[-1] == 5 and len(chosen) == 3 and chosen == sorted(chosen)
    assert stamps == [float(i) for i in chosen]


def test_select_frames_leaves_image_samples_alone() -> None:
    sample = video(5, {"timestamps": [1.0, 2.0, 3.0, 4.0, 5.0]}, task="ocr")
    frames, stamps = select_frames(sample, 2)
    assert frames is sample.images and stamps is None


# ---------------------------------------------------------------------------------------------------
# image_token_count
# ---------------------------------------------------------------------------------------------------


SIZES = [(1, 1), (5, 7), (28, 28), (56, 56), (57, 113), (100, 60), (1, 400), (400, 1), (2, 3000), (3000, 2),
         (1000, 1000), (4000, 3000), (20000, 3), (333, 777)]


@pytest.mark.parametrize("config", [
    SeedViTConfig(width=32, depth=2, num_heads=2, min_pixels=3136, max_pixels=12544),
    SeedViTConfig(width=32, depth=1, num_heads=2, min_pixels=784, max_pixels=256 * 28 * 28)], ids=["tiny", "wide"])
def test_image_token_count_matches_the_vits_pooled_tokens(config: SeedViTConfig) -> None:
    counts = []
    for width, height in SIZES:
        image = Image.new("RGB", (width, height), (10, 20, 30))
        _, (grid_h, grid_w) = image_to_patches(image, config)
        assert grid_h % config.merge_size == 0 and grid_w % config.merge_size == 0
        count = image_token_count(image, config)
        assert count == grid_h * grid_w // config.merge_size ** 2, (width, height)
        assert 1 <= count <= config.max_pixels // (28 * 28)
        counts.append(count)
    assert len(set(counts)) > 3  # the sizes do exercise different counts


# ---------------------------------------------------------------------------------------------------
# MixedStream and held_out_samples
# ---------------------------------------------------------------------------------------------------


def shard_row(key: str, task: str, media: list[bytes], caption: str = "", conversations: Any = None,
              repeat_of: str | None = None) -> dict[str, Any]:
    labels = {"caption": caption or None, "width": 16, "height": 16, "source": "synthetic", "meta": "{}",
              "conversations": json.dumps(conversations or []), "annotations": "{}"}
    return {"key": key, "task": task, "media": media, "image_ext": "jpg", "txt": caption,
            "sample_json": sample_json(labels, task, key, repeat_of)}


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """caption: 30 originals (every 5th with a rebalancing copy) and one corrupt; ocr: 30 samples where
    pairs share a picture; grounding: 10 samples (given weight 0 by the tests)."""
    root = tmp_path_factory.mktemp("shards")
    caption_rows = [shard_row(f"cap{i:03d}", "caption", [jpeg(i)], caption=f"caption number {i}") for i in range(30)]
    caption_rows += [shard_row(f"cap{i:03d}_r1", "caption", [jpeg(i)], caption=f"caption number {i}",
                               repeat_of=f"cap{i:03d}") for i in range(0, 30, 5)]
    caption_rows.append(shard_row("cap999", "caption", [jpeg(1)[:50]], caption="a broken picture"))
    ocr_rows = [shard_row(f"ocr{i:03d}", "ocr", [jpeg(100 + i // 2)], conversations=qa("<image>\nRead it.", f"T{i}"))
                for i in range(30)]
    grounding_rows = [shard_row(f"gr{i:03d}", "grounding", [jpeg(200 + i)],
                                conversations=qa("<image>\nWhere?", "<box>[1, 2, 3, 4]</box>")) for i in range(10)]
    for task, rows in (("caption", caption_rows), ("ocr", ocr_rows), ("grounding", grounding_rows)):
        (root / task).mkdir()
        half = len(rows) // 2
        write_tar(root / task / "shard-000000.tar", rows[:half])
        write_tar(root / task / "shard-000001.tar", rows[half:])
    return root


def _held_out_originals(shards_dir: Path) -> dict[str, set[str]]:
    """Independently of data.py: the original keys of each task on the held-out side."""
    held: dict[str, set[str]] = {}
    for task in ("caption", "ocr", "grounding"):
        keys = set()
        for shard in sorted((shards_dir / task).glob("*.tar")):
            for sample in read_shard(shard, DropCounter()):
                if "_r" in sample.key:
                    continue
                image = sample.members["jpg"]
                on = sample.key if task == "caption" else "media:" + hashlib.sha1(image).hexdigest()
                if is_held_out(on, FRACTION):
                    keys.add(sample.key)
        held[task] = keys
    return held


MIX = {"caption": 3.0, "ocr": 1.0, "grounding": 0.0}


def stream(shards_dir: Path, counter: DropCounter | None = None, **resume: Any) -> MixedStream:
    return MixedStream(shards_dir, MIX, rank=0, world_size=1, seed=11, holdout_fraction=FRACTION,
                       counter=counter if counter is not None else DropCounter(), **resume)


def test_mixed_stream_follows_the_weights_and_skips_held_out(shards_dir: Path) -> None:
    counter = DropCounter()
    samples = list(itertools.islice(iter(stream(shards_dir, counter)), 400))
    tasks = Counter(sample.task for sample in samples)
    assert set(tasks) == {"caption", "ocr"}  # weight 0: never drawn
    assert 0.67 < tasks["caption"] / len(samples) < 0.83
    held = _held_out_originals(shards_dir)
    assert held["caption"] and held["ocr"]  # the fixture does test the split
    seen = {sample.key for sample in samples}
    base = {key.partition("_r")[0] for key in seen}
    assert not base & (held["caption"] | held["ocr"])
    # every training original (and its copy) was drawn, and with the held-out ones they are all decodable
    originals = {f"cap{i:03d}" for i in range(30)} | {f"ocr{i:03d}" for i in range(30)}  # cap999 never decodes
    assert base | held["caption"] | held["ocr"] == originals
    assert {f"cap{i:03d}_r1" for i in range(0, 30, 5)} - seen == \
        {f"cap{i:03d}_r1" for i in range(0, 30, 5) if f"cap{i:03d}" in held["caption"]}
    assert counter["corrupt_image"] > 0 and set(counter) == {"corrupt_image"}
    # samples sharing a picture (ocr 2k and 2k+1) fall on the same side
    for i in range(0, 30, 2):
        assert (f"ocr{i:03d}" in held["ocr"]) == (f"ocr{i + 1:03d}" in held["ocr"])


def test_held_out_samples_are_the_decodable_held_out_originals(shards_dir: Path) -> None:
    counter = DropCounter()
    held_samples = list(held_out_samples(shards_dir, ("caption", "ocr", "grounding", "video"), FRACTION, counter))
    held = _held_out_originals(shards_dir)
    by_task: dict[str, list[str]] = {}
    for sample in held_samples:
        by_task.setdefault(sample.task, []).append(sample.key)
        assert sample.images and sample.info["key"] == sample.key
    assert {task: set(keys) for task, keys in by_task.items()} == {task: keys for task, keys in held.items() if keys}
    assert all(len(keys) == len(set(keys)) for keys in by_task.values())  # each once
    assert not any("_r" in sample.key for sample in held_samples)  # copies are never evaluated
    assert [s.task for s in held_samples] == sorted((s.task for s in held_samples),
                                                    key=["caption", "ocr", "grounding"].index)


def test_held_out_captions_were_held_out_from_the_vit_too(shards_dir: Path) -> None:
    """With a fraction no larger than the ViT's, the VLM's held-out captions are among the ViT's."""
    vlm_held = {s.key for s in held_out_samples(shards_dir, ("caption",), FRACTION, DropCounter())}
    vit_stream = ShardStream(task_shards(shards_dir, ("caption",)), 0, 1, 0, held_out=True, holdout_fraction=0.5,
                             counter=DropCounter())
    vit_held = {sample.key for sample in vit_stream.epoch(0)}
    assert vlm_held and vlm_held <= vit_held and vit_held - vlm_held


def test_mixed_stream_resumes_exactly(shards_dir: Path) -> None:
    original = stream(shards_dir)
    iterator = iter(original)
    first = [next(iterator).key for _ in range(57)]
    positions, draws = dict(original.positions), original.draws
    assert draws >= 57 and set(positions) == {"caption", "ocr"} and all(v > 0 for v in positions.values())
    following = [next(iterator).key for _ in range(60)]
    resumed = stream(shards_dir, positions=positions, draws=draws)
    assert [sample.key for sample in itertools.islice(iter(resumed), 60)] == following
    fresh = [sample.key for sample in itertools.islice(iter(stream(shards_dir)), 57)]
    assert fresh == first  # a pure function of the seed
    assert following != first[:60]
    # only the positions, or only the draws, would not replay the same stream
    wrong_draws = stream(shards_dir, positions=positions, draws=0)
    assert [sample.key for sample in itertools.islice(iter(wrong_draws), 60)] != following


def test_mixed_stream_without_shards_for_its_tasks_raises(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has shards"):
        MixedStream(shards_dir, {"video": 1.0, "grounding": 0.0}, 0, 1, 0, FRACTION, DropCounter())
    with pytest.raises(ValueError, match="has shards"):
        MixedStream(tmp_path, {"caption": 1.0}, 0, 1, 0, FRACTION, DropCounter())


# ---------------------------------------------------------------------------------------------------
# corpus_texts
# ---------------------------------------------------------------------------------------------------


def test_corpus_texts_has_captions_questions_and_answers_without_placeholders() -> None:
    sample = VlmSample(key="k", task="ocr", images=[], info={
        "caption": "  a red circle  ",
        "conversations": [
            {"from": "human", "value": "<image>\nRead the text."}, {"from": "gpt", "value": "HELLO 42"},
            {"role": "user", "content": "<video>\n<image>"},  # nothing left once the placeholders go
            {"role": "assistant", "content": "From 4.0 to 4.2 seconds."},
            "not a turn", {"from": "human", "value": None},
            {"from": "human", "value": "Compare <image> with <image> please."},
            {"from": "gpt", "value": "<box>[1, 2]</box>"},
        ]})
    texts = corpus_texts(sample)
    assert texts == ["a red circle", "Read the text.", "HELLO 42", "From 4.0 to 4.2 seconds.",
                     "Compare  with  please.", "<box>[1, 2]</box>"]
    assert not any("<image>" in text or "<video>" in text for text in texts)
    assert corpus_texts(VlmSample(key="e", task="caption", images=[], info={"caption": "   "})) == []
    assert corpus_texts(VlmSample(key="e", task="caption", images=[], info={"caption": "x", "conversations": "bad"})) \
        == ["x"]


def test_corpus_texts_of_decoded_shard_samples(shards_dir: Path) -> None:
    samples = list(itertools.islice(iter(stream(shards_dir)), 40))
    for sample in samples:
        texts = corpus_texts(sample)
        if sample.task == "caption":
            assert texts == [sample.info["caption"]]
        else:
            number = int(sample.key[3:])
            assert texts == ["Read it.", f"T{number}"]
    assert np.mean([s.task == "caption" for s in samples]) > 0.5
