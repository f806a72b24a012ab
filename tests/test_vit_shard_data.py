"""The pretraining data stream over shards built inside each test: grouping, drops counted by reason,
truncated shards, per-worker sharding, the held-out split, resuming, held-out pairs and video frames."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from components.data.write_shards import sample_json, write_tar
from components.training.shards import (MAX_EMPTY_EPOCHS, DropCounter, RawSample, ShardStream, is_held_out,
                                        read_shard)
from components.vit.shard_data import MAX_CONSECUTIVE_DROPS, decode, decoded, held_out_pairs

FULL_MEMBERS = ["jpg", "json", "txt"]


def jpeg(level: int = 128, size: tuple[int, int] = (16, 16)) -> bytes:
    """A small solid-gray JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (level, level, level)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def row(key: str, caption: str | None = None, repeat_of: str | None = None, task: str = "caption",
        media: list[bytes] | None = None) -> dict[str, Any]:
    """A shard row as `write_tar` takes it, its json made by the shard writer's own `sample_json`."""
    caption = f"a caption of {repeat_of or key}" if caption is None else caption
    labels = {"caption": caption, "width": 16, "height": 16, "source": "synthetic", "meta": "{}"}
    return {"key": key, "task": task, "media": media or [jpeg()], "image_ext": "jpg", "txt": caption,
            "sample_json": sample_json(labels, task, key, repeat_of)}


def write_shard(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(path, rows)
    return path


def write_members(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (for layouts the shard writer never makes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def keys_of(samples: Iterable[RawSample]) -> list[str]:
    return [raw.key for raw in samples]


def epoch_keys(shards: list[Path], rank: int, world_size: int, held_out: bool, fraction: float,
               seed: int = 0) -> list[str]:
    stream = ShardStream(shards, rank, world_size, seed, held_out, fraction, DropCounter())
    return keys_of(stream.epoch(0))


def base_key_of(key: str) -> str:
    return key.partition("_r")[0]


# --- reading and decoding ---------------------------------------------------------------------------

def test_read_shard_groups_members_by_key(tmp_path: Path) -> None:
    rows = [row("k000"), row("k001"), row("k001_r1", repeat_of="k001"), row("k002")]
    counter = DropCounter()
    raws = list(read_shard(write_shard(tmp_path / "caption" / "shard-000000.tar", rows), counter))
    assert keys_of(raws) == ["k000", "k001", "k001_r1", "k002"]
    assert all(sorted(raw.members) == FULL_MEMBERS for raw in raws)
    assert raws[1].members["txt"] == b"a caption of k001"
    assert raws[2].base_key() == "k001" and raws[1].base_key() == "k001"
    assert json.loads(raws[2].members["json"])["repeat_of"] == "k001"
    assert counter == DropCounter()


def test_read_shard_keys_follow_webdatasets_rule_as_ingest_does(tmp_path: Path) -> None:
    shard = write_members(tmp_path / "s.tar", [("some/dir/k0.jpg", jpeg()), ("some/dir/k0.txt", b"x"),
                                               ("other/k1.jpg", jpeg()), ("other/k1.txt", b"y")])
    raws = list(read_shard(shard, DropCounter()))
    assert keys_of(raws) == ["some/dir/k0", "other/k1"]  # the path up to the file name's first dot
    assert [raw.members["txt"] for raw in raws] == [b"x", b"y"]


def test_bad_samples_are_dropped_and_counted_by_reason(tmp_path: Path) -> None:
    good_json = json.dumps({"task": "caption", "caption": "from json"}).encode()
    no_caption_json = json.dumps({"task": "caption", "caption": None}).encode()
    shard = write_members(tmp_path / "s.tar", [
        ("a_good.jpg", jpeg()), ("a_good.txt", b"a red square"), ("a_good.json", good_json),
        ("b_corrupt.jpg", jpeg()[:40]), ("b_corrupt.txt", b"cut image"), ("b_corrupt.json", good_json),
        ("c_nocaption.jpg", jpeg()), ("c_nocaption.txt", b"  \n"), ("c_nocaption.json", no_caption_json),
        ("d_noimage.txt", b"text only"), ("d_noimage.json", good_json),
        ("e_badjson.jpg", jpeg()), ("e_badjson.txt", b"x"), ("e_badjson.json", b"{not json"),
        ("f_jsoncaption.jpg", jpeg()), ("f_jsoncaption.txt", b""), ("f_jsoncaption.json", good_json),
        ("g_garbage.jpg", b"\x00" * 300), ("g_garbage.txt", b"zeros"),
    ])
    counter = DropCounter()
    raws = list(read_shard(shard, counter))
    kept = list(decoded(iter(raws), counter))
    assert [sample.key for sample in kept] == ["a_good", "f_jsoncaption"]
    assert kept[0].caption == "a red square" and kept[1].caption == "from json"  # txt first, json as fallback
    assert kept[0].images[0].size == (16, 16) and kept[0].images[0].mode == "RGB"
    assert counter == {"kept": 2, "corrupt_image": 2, "caption_missing": 1, "missing_image": 1, "bad_json": 1}
    assert counter["kept"] + sum(n for reason, n in counter.items() if reason != "kept") == len(raws) == 7
    assert counter.as_metrics("drops/")["drops/corrupt_image"] == 2.0


def test_decode_returns_video_frames_in_order(tmp_path: Path) -> None:
    levels = [10 + 20 * i for i in range(12)]  # frame0010 and frame0011 must not sort before frame0002
    frames = [(f"clip.frame{i:04d}.jpg", jpeg(level)) for i, level in enumerate(levels)]
    json_member = ("clip.json", json.dumps({"task": "video", "caption": "a clip"}).encode())
    shard = write_members(tmp_path / "v.tar", [*reversed(frames), ("clip.txt", b"a clip"), json_member])
    counter = DropCounter()
    (raw,) = read_shard(shard, counter)
    sample = decode(raw, counter)
    assert sample is not None and sample.task == "video" and sample.caption == "a clip"
    assert [abs(image.getpixel((8, 8))[0] - level) <= 3 for image, level in zip(sample.images, levels)] == \
        [True] * len(levels)
    assert len(sample.images) == len(levels) and counter == {"kept": 1}


def test_decode_of_a_shard_writer_video_sample(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "video" / "shard-000000.tar",
                        [row("clip", task="video", media=[jpeg(30), jpeg(130), jpeg(230)])])
    (raw,) = read_shard(shard, DropCounter())
    assert sorted(raw.members) == ["frame0000.jpg", "frame0001.jpg", "frame0002.jpg", "json", "txt"]
    sample = decode(raw, DropCounter())
    assert sample is not None and sample.task == "video"
    assert [round(image.getpixel((8, 8))[0] / 100) for image in sample.images] == [0, 1, 2]


def test_a_corrupt_frame_drops_the_whole_clip() -> None:
    raw = RawSample("clip", {"frame0000.jpg": jpeg(), "frame0001.jpg": b"broken", "txt": b"a clip"})
    counter = DropCounter()
    assert decode(raw, counter) is None
    assert counter == {"corrupt_image": 1}


def test_json_that_is_not_an_object_is_bad_json() -> None:
    raw = RawSample("k", {"jpg": jpeg(), "txt": b"a caption", "json": b"null"})
    counter = DropCounter()
    assert raw.base_key() == "k"
    assert decode(raw, counter) is None
    assert counter == {"bad_json": 1}


# --- truncated shards -------------------------------------------------------------------------------

def five_samples(folder: Path, name: str) -> Path:
    return write_shard(folder / name, [row(f"{name[0]}{i:03d}") for i in range(5)])


def cut(shard: Path, member: str, where: str) -> Path:
    """Truncate a shard: at `member`'s header ("boundary"), inside its header or in the middle of its data."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    offset = {"boundary": info.offset, "header": info.offset + 100, "data": info.offset_data + info.size // 2}[where]
    data = shard.read_bytes()
    assert 0 < offset < len(data)
    shard.write_bytes(data[:offset])
    return shard


def test_truncated_shard_keeps_complete_samples_and_the_stream_goes_on(tmp_path: Path) -> None:
    first = cut(five_samples(tmp_path, "a.tar"), "a002.txt", "data")
    second = five_samples(tmp_path, "b.tar")
    counter = DropCounter()
    raws = list(read_shard(first, counter))
    assert keys_of(raws) == ["a000", "a001"]
    assert all(sorted(raw.members) == FULL_MEMBERS for raw in raws)
    assert counter["truncated_shard"] == 1 and counter["truncated_sample"] == 1

    counter = DropCounter()
    stream = ShardStream([first, second], rank=0, world_size=1, seed=0, held_out=False, holdout_fraction=0.0,
                         counter=counter)
    assert sorted(keys_of(stream.epoch(0))) == ["a000", "a001", "b000", "b001", "b002", "b003", "b004"]
    assert counter["truncated_shard"] == 1
    assert len(list(itertools.islice(iter(stream), 20))) == 20  # endless, and never raises on the bad shard


def test_an_empty_or_garbage_shard_is_counted_not_fatal(tmp_path: Path) -> None:
    empty, garbage = tmp_path / "empty.tar", tmp_path / "garbage.tar"
    empty.write_bytes(b"")
    garbage.write_bytes(b"this is not a tar file at all" * 40)
    counter = DropCounter()
    assert list(read_shard(empty, counter)) == [] and list(read_shard(garbage, counter)) == []
    assert counter["truncated_shard"] == 2


@pytest.mark.parametrize("member, where", [
    ("a002.txt", "data"),
    ("a002.json", "data"),
    pytest.param("a002.jpg", "data"),
    pytest.param("a002.txt", "boundary"),
    pytest.param("a002.json", "header"),
])
def test_every_cut_keeps_exactly_the_complete_samples(tmp_path: Path, member: str, where: str) -> None:
    shard = cut(five_samples(tmp_path, "a.tar"), member, where)
    counter = DropCounter()
    raws = list(read_shard(shard, counter))
    assert keys_of(raws) == ["a000", "a001"]
    assert all(sorted(raw.members) == FULL_MEMBERS for raw in raws)
    assert counter["truncated_shard"] == 1


# --- per-worker sharding and the held-out split -----------------------------------------------------

def split_data(folder: Path, num_shards: int, per_shard: int) -> tuple[list[Path], list[str]]:
    """Caption shards of originals plus a rebalancing copy of every third one; returns (shards, all keys)."""
    shards, keys = [], []
    for s in range(num_shards):
        rows = []
        for i in range(per_shard):
            key = f"s{s}-{i:03d}"
            rows.append(row(key))
            if i % 3 == 0:
                rows.append(row(f"{key}_r1", repeat_of=key))
        shards.append(write_shard(folder / "caption" / f"shard-{s:06d}.tar", rows))
        keys += [r["key"] for r in rows]
    return shards, keys


@pytest.mark.parametrize("num_shards", [4, 1], ids=["shard-level", "sample-level"])
def test_ranks_split_an_epoch_disjointly_and_held_out_is_the_complement(tmp_path: Path, num_shards: int) -> None:
    shards, keys = split_data(tmp_path, num_shards, per_shard=24 // num_shards)
    fraction = 0.3
    train = {k for k in keys if not is_held_out(base_key_of(k), fraction)}
    held = set(keys) - train
    assert train and held  # the split is not trivial on this data

    for held_out, expected in ((False, train), (True, held)):
        rank0, rank1 = (epoch_keys(shards, rank, 2, held_out, fraction) for rank in (0, 1))
        assert len(rank0) == len(set(rank0)) and len(rank1) == len(set(rank1))
        assert not set(rank0) & set(rank1)
        assert set(rank0) | set(rank1) == expected
        assert rank0 and rank1  # both workers get data
    one_worker = epoch_keys(shards, 0, 1, False, fraction)
    assert sorted(one_worker) == sorted(train)


def test_only_caption_shards_are_split(tmp_path: Path) -> None:
    captions, caption_keys = split_data(tmp_path, 2, per_shard=6)
    others = [write_shard(tmp_path / task / "shard-000000.tar", [row(f"{task}{i}", task=task) for i in range(6)])
              for task in ("ocr", "grounding")]
    other_keys = [f"{task}{i}" for task in ("ocr", "grounding") for i in range(6)]
    assert sorted(epoch_keys(captions + others, 0, 1, False, 1.0)) == sorted(other_keys)
    assert sorted(epoch_keys(captions + others, 0, 1, True, 1.0)) == sorted(caption_keys)
    with pytest.raises(RuntimeError, match="no readable samples"):
        next(iter(ShardStream(others, 0, 1, 0, held_out=True, holdout_fraction=1.0, counter=DropCounter())))


def test_shard_level_split_gives_each_shard_to_one_worker(tmp_path: Path) -> None:
    shards, _ = split_data(tmp_path, 4, per_shard=6)
    for epoch_seed in range(3):
        owners = {}
        for rank in (0, 1):
            for key in epoch_keys(shards, rank, 2, False, 0.0, seed=epoch_seed):
                owners.setdefault(key.partition("-")[0], set()).add(rank)
        assert sorted(owners) == ["s0", "s1", "s2", "s3"]
        assert all(len(ranks) == 1 for ranks in owners.values())


def test_is_held_out_is_stable_and_close_to_the_fraction() -> None:
    keys = [f"src-{i:06d}" for i in range(10_000)]
    held = [is_held_out(key, 0.1) for key in keys]
    assert held == [is_held_out(key, 0.1) for key in keys]
    assert abs(sum(held) / len(keys) - 0.1) <= 0.02
    wider = [is_held_out(key, 0.2) for key in keys]
    assert all(w for h, w in zip(held, wider) if h)  # a larger fraction only adds keys
    assert not any(is_held_out(key, 0.0) for key in keys[:500])
    assert all(is_held_out(key, 1.0) for key in keys[:500])


def test_rebalancing_copies_fall_on_their_originals_side() -> None:
    for i in range(2_000):
        key = f"src-{i:06d}"
        for copy in (1, 2):
            raw = RawSample(f"{key}_r{copy}", {"json": sample_json(
                {"caption": "c", "width": 1, "height": 1, "source": "s", "meta": "{}"}, "caption",
                f"{key}_r{copy}", key).encode()})
            assert raw.base_key() == key
            assert is_held_out(raw.base_key(), 0.1) == is_held_out(key, 0.1)
    assert RawSample("k", {"json": b"{broken"}).base_key() == "k"
    assert RawSample("k", {"jpg": b""}).base_key() == "k"
    assert RawSample("k", {"json": json.dumps({"repeat_of": None}).encode()}).base_key() == "k"


# --- resuming ---------------------------------------------------------------------------------------

def test_skip_resumes_exactly_across_an_epoch_boundary(tmp_path: Path) -> None:
    shards, _ = split_data(tmp_path, 3, per_shard=5)
    shards.append(cut(five_samples(tmp_path, "t.tar"), "t003.json", "data"))  # a truncated shard in the mix
    fraction = 0.25

    def stream(counter: DropCounter) -> ShardStream:
        return ShardStream(shards, rank=0, world_size=1, seed=0, held_out=False, holdout_fraction=fraction,
                           counter=counter)

    epoch0, epoch1 = (keys_of(stream(DropCounter()).epoch(epoch)) for epoch in (0, 1))
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # same samples, reshuffled shard order
    epoch_length = len(epoch0)
    consumed = epoch_length - 3  # the next 10 samples cross into epoch 1
    whole = keys_of(itertools.islice(iter(stream(DropCounter())), consumed + 10))

    first = stream(DropCounter())
    iterator = iter(first)
    assert keys_of(itertools.islice(iterator, consumed)) == whole[:consumed]
    assert first.position == consumed

    before = DropCounter({"kept": 11, "corrupt_image": 2})  # a checkpoint's counts, restored
    counter = before.copy()
    resumed = stream(counter)
    rest = resumed.skip(consumed)
    assert counter == before  # skipped samples (and the truncated shard among them) are not counted again
    assert resumed.position == consumed
    assert keys_of(itertools.islice(rest, 10)) == whole[consumed:]
    assert resumed.position == consumed + 10
    uninterrupted = DropCounter()
    keys_of(itertools.islice(iter(stream(uninterrupted)), consumed + 10))
    assert counter - before == uninterrupted - first.counter  # what the resumed part counted is the same


def test_skip_zero_is_the_start(tmp_path: Path) -> None:
    shards, _ = split_data(tmp_path, 2, per_shard=3)
    counter = DropCounter()
    stream = ShardStream(shards, 0, 1, 0, False, 0.0, counter)
    assert keys_of(itertools.islice(stream.skip(0), 4)) == keys_of(itertools.islice(
        iter(ShardStream(shards, 0, 1, 0, False, 0.0, DropCounter())), 4))


# --- held-out pairs and endless streams -------------------------------------------------------------

def test_held_out_pairs_are_decoded_originals_in_key_order(tmp_path: Path) -> None:
    fraction = 0.5
    keys = [f"c{i:03d}" for i in range(40)]
    held = sorted(k for k in keys if is_held_out(k, fraction))
    corrupt = held[1]
    originals = [row(key, media=[jpeg()[:30]] if key == corrupt else None) for key in keys]
    copies = [row(f"{key}_r1", repeat_of=key) for key in keys]  # a copy of every held-out original too
    write_shard(tmp_path / "caption" / "shard-000000.tar", originals[20:] + copies[:20])  # read first
    write_shard(tmp_path / "caption" / "shard-000001.tar", originals[:20] + copies[20:])
    write_shard(tmp_path / "ocr" / "shard-000000.tar", [row(f"ocr{i}", task="ocr") for i in range(20)])
    expected = [k for k in held if k != corrupt]
    assert any(is_held_out(f"ocr{i}", fraction) for i in range(20))  # ocr shards are ignored, not just lucky

    pairs = held_out_pairs(tmp_path, fraction, max_pairs=1_000)
    assert [pair.key for pair in pairs] == expected
    assert all(pair.caption == f"a caption of {pair.key}" and pair.task == "caption" for pair in pairs)
    assert all(len(pair.images) == 1 and pair.images[0].size == (16, 16) for pair in pairs)
    assert [pair.key for pair in held_out_pairs(tmp_path, fraction, max_pairs=3)] == expected[:3]
    assert held_out_pairs(tmp_path, 0.0, max_pairs=10) == []
    assert held_out_pairs(tmp_path / "missing", fraction, max_pairs=10) == []


def test_all_corrupt_samples_raise_instead_of_spinning(tmp_path: Path) -> None:
    shard = tmp_path / "caption" / "shard-000000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for index in range(3):
            for ext, payload in (("jpg", b"notajpeg"), ("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"k{index}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    counter = DropCounter()
    with pytest.raises(RuntimeError, match="could not be used"):
        next(decoded(iter(ShardStream([shard], 0, 1, 0, False, 0.0, counter)), counter))
    assert counter["corrupt_image"] == MAX_CONSECUTIVE_DROPS


def test_an_endless_stream_without_usable_samples_raises(tmp_path: Path) -> None:
    shards, _ = split_data(tmp_path, 2, per_shard=4)
    all_held_out = ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=1.0, counter=DropCounter())
    with pytest.raises(RuntimeError, match="no readable samples"):
        next(iter(all_held_out))
    none_held_out = ShardStream(shards, 0, 1, 0, held_out=True, holdout_fraction=0.0, counter=DropCounter())
    with pytest.raises(RuntimeError, match="no readable samples"):
        next(iter(none_held_out))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    counter = DropCounter()
    with pytest.raises(RuntimeError, match="worker 0"):
        next(iter(ShardStream([empty], 0, 1, 0, False, 0.0, counter)))
    assert counter["truncated_shard"] == MAX_EMPTY_EPOCHS  # that many empty epochs, then the error
    with pytest.raises(ValueError, match="no shards"):
        ShardStream([], 0, 1, 0, False, 0.0, DropCounter())


def test_one_unreadable_shard_is_never_fatal(tmp_path: Path) -> None:
    good = write_shard(tmp_path / "good.tar", [row(f"g{i}") for i in range(3)])
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"")
    for seed in range(4):
        for rank in (0, 1):
            stream = ShardStream([good, bad], rank, 2, seed, False, 0.0, DropCounter())
            assert len(list(itertools.islice(iter(stream), 30))) == 30
