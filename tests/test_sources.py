"""Readers and validation on the real public files in shared/data/real, and on broken copies of them."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
from PIL import Image

from components.data.config import SourceConfig
from components.data.ingest import validate
from components.common.webdataset_tar import split_member_name
from components.data.lib.sources import EmptySourceError, plan_reads, read_task

MAX_PIXELS = 178_956_970


def rows_of(source: SourceConfig) -> list[dict]:
    return [validate(record, MAX_PIXELS) for task in plan_reads(source) for record in read_task(task)]


def test_member_names_split_like_webdataset() -> None:
    assert split_member_name("0.jpg") == ("0", "jpg")
    assert split_member_name("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert split_member_name("README") == ("README", "")


def test_img2dataset_shard(real_data: Path) -> None:
    rows = rows_of(SourceConfig("webdataset", str(real_data / "img2dataset_shard_00000.tar"), name="nemo"))
    assert len(rows) == 1
    row = rows[0]
    assert row["drop_reason"] is None
    assert row["key"] == "nemo-img2dataset_shard_00000-0"
    assert row["caption"].startswith("A wine bottle outfitted with two forks")
    assert row["image_ext"] == "jpg" and row["width"] > 0 and row["height"] > 0
    assert '"caption"' in row["meta"]  # the shard's own json is kept


def test_ingest_computes_dedups_signals_on_its_own_decode(real_data: Path) -> None:
    """The sha256, pHash and thumbnail ingest stores are what dedup would compute from the bytes; with
    signals off they stay null, and dedup's `add_signals` then decodes exactly those rows."""
    from components.data.lib.signals import SIGNAL_NAMES, add_signals, decode_signals
    from components.data.lib.table import rows_to_table

    source = SourceConfig("folder", str(real_data / "odd_aspect_jpegs"))
    rows = rows_of(source)
    assert rows and all(r["drop_reason"] is None for r in rows)
    for row in rows:
        assert {name: row[name] for name in SIGNAL_NAMES} == decode_signals(row["image"])
    bare = [validate(record, MAX_PIXELS, signals=False) for task in plan_reads(source) for record in read_task(task)]
    assert all(r.get(name) is None for r in bare for name in SIGNAL_NAMES)
    mixed = rows_to_table([rows[0], *bare[1:]])
    filled = add_signals(mixed).to_pylist()
    assert [{n: r[n] for n in SIGNAL_NAMES} for r in filled] == [{n: r[n] for n in SIGNAL_NAMES} for r in rows]
    assert add_signals(rows_to_table(rows)).equals(rows_to_table(rows))  # nothing missing: returned as is


def test_webdataset_png_cls_shard(real_data: Path) -> None:
    rows = rows_of(SourceConfig("webdataset", str(real_data / "sample.tgz")))
    assert len(rows) == 90
    assert all(r["drop_reason"] is None and r["image_ext"] == "png" for r in rows)
    assert all(r["caption"] is None for r in rows)  # .cls labels, no captions
    assert len({r["key"] for r in rows}) == 90
    assert all('"cls"' in r["meta"] for r in rows)


def test_odd_aspect_folder(real_data: Path) -> None:
    rows = rows_of(SourceConfig("folder", str(real_data / "odd_aspect_jpegs")))
    assert len(rows) == 7
    for row in rows:  # files are named WIDTH_HEIGHT.jpg
        width, height = (int(v) for v in row["key"].split("-")[-1].split("_"))
        assert (row["width"], row["height"]) == (width, height)
        assert row["drop_reason"] is None


def test_truncated_shard_keeps_complete_samples(real_data: Path, tmp_path: Path) -> None:
    shard = tmp_path / "broken.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("a", "b", "c"):
            for ext, payload in (("jpg", _jpeg(300, 200)), ("txt", f"caption for {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(shard) as tar:
        last_image = tar.getmember("c.jpg")
    data = shard.read_bytes()
    shard.write_bytes(data[: last_image.offset_data + last_image.size // 2])  # cut inside c.jpg
    rows = rows_of(SourceConfig("webdataset", str(shard), name="t"))
    reasons = Counter(r["drop_reason"] for r in rows)
    assert reasons[None] == 2 and reasons["tar_truncated"] == 1
    assert {r["key"] for r in rows} == {"t-broken-a", "t-broken-b", "t-broken-c"}


def test_corrupt_images_and_captions_are_dropped_with_reasons(real_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(real_data / "odd_aspect_jpegs", folder)
    good = (folder / "123_456.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "garbage.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "latin1.jpg").write_bytes(good)
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "321_421.txt").write_text("a real caption")
    rows = rows_of(SourceConfig("folder", str(folder)))
    by_name = {r["key"].split("-")[-1]: r for r in rows}
    assert len(rows) == 11
    assert by_name["truncated"]["drop_reason"] == "image_corrupt"
    assert by_name["garbage"]["drop_reason"] == "image_corrupt"
    assert by_name["empty"]["drop_reason"] == "image_missing"
    assert by_name["latin1"]["drop_reason"] == "caption_not_utf8"
    assert by_name["321_421"]["caption"] == "a real caption"
    assert sum(r["drop_reason"] is None for r in rows) == 7


def test_orphan_caption_is_a_counted_drop(real_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(real_data / "odd_aspect_jpegs", folder)
    (folder / "lost_image.txt").write_text("a caption whose image is gone")
    rows = rows_of(SourceConfig("folder", str(folder), name="f"))
    assert len(rows) == 8  # 7 images + 1 orphan caption: counted in, dropped with a reason
    orphan = [r for r in rows if r["drop_reason"] is not None]
    assert [(r["key"], r["drop_reason"]) for r in orphan] == [("f-lost_image", "caption_without_image")]


def test_sources_with_nothing_to_read_fail_when_planned(real_data: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    shutil.copytree(real_data / "odd_aspect_jpegs", images)
    with pytest.raises(EmptySourceError, match=rf"webdataset source 'crawl': no tar files .* in {images} "
                                               r"\(it holds 7 files: 7 .jpg; .*kind 'folder'"):
        plan_reads(SourceConfig("webdataset", str(images), name="crawl"))
    empty = tmp_path / "parquets"
    empty.mkdir()
    with pytest.raises(EmptySourceError, match=rf"no .parquet files in {empty} \(it holds no files"):
        plan_reads(SourceConfig("parquet", str(empty)))
    with pytest.raises(EmptySourceError, match=r"folder source .*: no images"):
        plan_reads(SourceConfig("folder", str(empty)))
    with pytest.raises(FileNotFoundError, match=r"shards-\*\.tar glob matches nothing"):
        plan_reads(SourceConfig("webdataset", str(tmp_path / "shards-*.tar")))
    globbed = plan_reads(SourceConfig("webdataset", str(real_data / "*.t*"), name="g"))  # a glob that matches
    assert sorted(Path(t.paths[0]).name for t in globbed) == ["img2dataset_shard_00000.tar", "sample.tgz"]


def test_parquet_with_bytes_and_with_paths(real_data: Path, tmp_path: Path) -> None:
    jpeg = _jpeg(320, 240)
    (tmp_path / "img.jpg").write_bytes(jpeg)
    pq.write_table(pa.table({"caption": ["bytes caption", "no image"], "image": [jpeg, None]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"caption": ["path caption", "gone"], "path": ["img.jpg", "missing.jpg"]}),
                   tmp_path / "p.parquet")
    bytes_rows = rows_of(SourceConfig("parquet", str(tmp_path / "b.parquet")))
    path_rows = rows_of(SourceConfig("parquet", str(tmp_path / "p.parquet")))
    assert [r["drop_reason"] for r in bytes_rows] == [None, "image_missing"]
    assert [r["drop_reason"] for r in path_rows] == [None, "image_file_missing"]
    assert (bytes_rows[0]["width"], bytes_rows[0]["height"]) == (320, 240)


def test_laion_parquet_without_images_is_counted_not_lost(real_data: Path) -> None:
    source = SourceConfig("parquet", str(real_data / "laion_test_1000.parquet"), caption_column="TEXT")
    rows = rows_of(source)
    assert len(rows) == 1000
    assert Counter(r["drop_reason"] for r in rows) == {"image_missing": 1000}  # URLs only, not fetched


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()
