"""Readers that turn one input file (or a chunk of a folder) into raw records, without decoding.

Three layouts: WebDataset / img2dataset tars (`.tar`, `.tar.gz`, `.tgz`; members grouped by key, the
part of the name before its first dot), parquet files with captions and image bytes or image paths,
and folders of images with same-stem `.txt` captions (and optional `.json`). A record carries the
image bytes, the caption *bytes* and the source's metadata; anything that cannot be read becomes a
record with a `read_error`, so the count of records in is exact and nothing disappears (a folder's
caption file with no image of its stem is one such record). A source's path may be a glob; a source
that has no file of its kind (a glob matching nothing, a folder without tars) fails when its reads
are planned, naming the path and what was looked for.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from components.common.webdataset_tar import TarCut, iter_samples
from components.data.config import SourceConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FOLDER_CHUNK = 256  # images per read task for folder sources
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")


class EmptySourceError(ValueError):
    """A configured source with nothing to read: a configuration error, raised before any reading."""


@dataclass
class RawRecord:
    key: str
    source: str
    image: bytes | None = None
    image_ext: str | None = None
    caption: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    read_error: str | None = None


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading work: a tar, a parquet file, or a chunk of a folder's images."""

    kind: str
    source: str
    paths: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()

    def to_row(self) -> dict[str, str]:
        return {"task": json.dumps({"kind": self.kind, "source": self.source, "paths": self.paths,
                                    "options": self.options})}

    @classmethod
    def from_row(cls, row: str) -> ReadTask:
        loaded = json.loads(row)
        return cls(loaded["kind"], loaded["source"], tuple(loaded["paths"]),
                   tuple(tuple(o) for o in loaded["options"]))  # type: ignore[misc]


def safe_key(*parts: str) -> str:
    """A WebDataset-safe key (no dots or slashes) from its parts."""
    return "-".join(_UNSAFE_KEY.sub("_", p).strip("_") or "_" for p in parts)


def source_name(source: SourceConfig) -> str:
    return safe_key(source.name or _stem(Path(source.path)))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in TAR_SUFFIXES + (".parquet",):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_glob(path: str) -> bool:
    return glob.has_magic(path)


def source_roots(source: SourceConfig) -> list[Path]:
    """The files or folders a source's path names: itself, or a glob's matches (`**` recurses)."""
    pattern = str(Path(source.path).expanduser())
    if Path(pattern).exists():  # a real name with [ or * in it is taken as it is
        return [Path(pattern)]
    return [Path(p) for p in sorted(glob.glob(pattern, recursive=True))] if is_glob(pattern) else []


def _files_under(roots: list[Path]) -> list[Path]:
    return sorted({f for root in roots for f in ([root] if root.is_file() else root.rglob("*")) if f.is_file()})


def _describe(files: list[Path]) -> str:
    """'12 files: 10 .jpg, 2 .txt' (the three most common suffixes), or 'no files'."""
    if not files:
        return "no files"
    suffixes: dict[str, int] = {}
    for f in files:
        suffixes[f.suffix.lower() or "(no suffix)"] = suffixes.get(f.suffix.lower() or "(no suffix)", 0) + 1
    common = sorted(suffixes.items(), key=lambda item: (-item[1], item[0]))[:3]
    return f"{len(files)} files: " + ", ".join(f"{count} {suffix}" for suffix, count in common)


def _empty(source: SourceConfig, name: str, looked_for: str, files: list[Path]) -> EmptySourceError:
    hint = {"webdataset": "a folder of images with .txt captions is a source of kind 'folder' in data.ingest.sources",
            "parquet": "tars are kind 'webdataset', a folder of images is kind 'folder'",
            "folder": "tars are kind 'webdataset', parquet files kind 'parquet'"}[source.kind]
    return EmptySourceError(f"data.ingest.sources: {source.kind} source {name!r}: no {looked_for} in {source.path} "
                            f"(it holds {_describe(files)}; {hint})")


def plan_reads(source: SourceConfig) -> list[ReadTask]:
    """Split a configured source into read tasks; a missing path, or one with no file of the source's
    kind, is a configuration error (`FileNotFoundError`, `EmptySourceError`)."""
    name = source_name(source)
    roots = source_roots(source)
    if not roots:
        what = "glob matches nothing" if is_glob(source.path) else "does not exist"
        raise FileNotFoundError(f"data.ingest.sources: {source.kind} source {name!r}: path {source.path} {what}")
    files = _files_under(roots)
    if source.kind == "webdataset":
        tars = [f for f in files if f.name.endswith(TAR_SUFFIXES)]
        if not tars:
            raise _empty(source, name, "tar files (" + ", ".join(TAR_SUFFIXES) + ")", files)
        return [ReadTask("webdataset", name, (str(f),)) for f in tars]
    if source.kind == "parquet":
        parquets = [f for f in files if f.suffix == ".parquet"]
        if not parquets:
            raise _empty(source, name, ".parquet files", files)
        options = (("caption_column", source.caption_column), ("image_column", source.image_column),
                   ("path_column", source.path_column))
        return [ReadTask("parquet", name, (str(f),), options) for f in parquets]
    images = [f for f in files if f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    if not images:
        raise _empty(source, name, "images (" + ", ".join("." + e for e in IMAGE_EXTENSIONS) + ")", files)
    stems = {f.with_suffix("") for f in images}
    orphans = [f for f in files if f.suffix == ".txt" and f.with_suffix("") not in stems]  # captions, no image
    listed = sorted(images + orphans)
    chunks = [listed[i : i + FOLDER_CHUNK] for i in range(0, len(listed), FOLDER_CHUNK)]
    root = roots[0] if len(roots) == 1 and roots[0].is_dir() else Path(os.path.commonpath([str(f.parent) for f in files]))
    return [ReadTask("folder", name, tuple(str(p) for p in chunk), (("root", str(root)),)) for chunk in chunks]


def read_task(task: ReadTask) -> Iterator[RawRecord]:
    options = dict(task.options)
    if task.kind == "webdataset":
        yield from read_tar(Path(task.paths[0]), task.source)
    elif task.kind == "parquet":
        yield from read_parquet(Path(task.paths[0]), task.source, options)
    elif task.kind == "folder":
        yield from read_folder_chunk([Path(p) for p in task.paths], Path(options["root"]), task.source)
    else:
        raise ValueError(f"unknown read task kind {task.kind!r}")


def read_tar(path: Path, source: str) -> Iterator[RawRecord]:
    """Group consecutive members by key. A truncated or unreadable archive yields what it holds and
    one `read_error` record for the part that was lost."""
    shard = _stem(path)
    try:
        for key, members in iter_samples(path):
            yield _record_from_members(source, shard, key, members)
    except TarCut as cut:
        lost = cut.partial_key or "archive"
        yield RawRecord(safe_key(source, shard, lost), source, meta={"file": str(path), "error": str(cut)},
                        read_error="tar_truncated" if cut.partial_key else "tar_unreadable")


def _record_from_members(source: str, shard: str, key: str, members: dict[str, bytes]) -> RawRecord:
    record = RawRecord(safe_key(source, shard, key), source)
    meta: dict[str, Any] = {"original_key": key, "shard": shard}
    if "json" in members:
        try:
            loaded = json.loads(members["json"])
            meta.update(loaded if isinstance(loaded, dict) else {"json": loaded})
        except (ValueError, UnicodeDecodeError):
            meta["json_error"] = "json member is not valid JSON"
    for ext in ("cls", "cls2", "class"):
        if ext in members:
            meta[ext] = members[ext].decode("utf-8", errors="replace").strip()
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            record.image, record.image_ext = members[ext], ext
            break
    if "txt" in members:
        record.caption = members["txt"]
    elif isinstance(meta.get("caption"), str):
        record.caption = meta["caption"].encode()
    record.meta = meta
    return record


def read_parquet(path: Path, source: str, options: dict[str, str]) -> Iterator[RawRecord]:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as error:
        yield RawRecord(safe_key(source, _stem(path)), source, meta={"file": str(path), "error": str(error)},
                        read_error="parquet_unreadable")
        return
    columns = set(parquet.schema_arrow.names)
    caption_col, image_col, path_col = options["caption_column"], options["image_column"], options["path_column"]
    row_index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            key = safe_key(source, _stem(path), str(row.get("key") or row_index))
            meta = {k: v for k, v in row.items() if k not in (image_col, caption_col) and _is_plain(v)}
            meta["row"] = row_index
            record = RawRecord(key, source, meta=meta)
            caption = row.get(caption_col) if caption_col in columns else None
            record.caption = caption.encode() if isinstance(caption, str) else caption
            if image_col in columns and row.get(image_col):
                record.image = row[image_col]
            elif path_col in columns and row.get(path_col):
                record.image, record.read_error = _read_relative(path.parent, str(row[path_col]))
            else:
                record.read_error = "image_missing"
            if record.image is not None:
                record.image_ext = _ext_hint(str(row.get(path_col) or ""))
            row_index += 1
            yield record


def _read_relative(base: Path, name: str) -> tuple[bytes | None, str | None]:
    target = Path(name) if Path(name).is_absolute() else base / name
    try:
        return target.read_bytes(), None
    except OSError:
        return None, "image_file_missing"


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _ext_hint(name: str) -> str | None:
    ext = name.rpartition(".")[2].lower()
    return ext if ext in IMAGE_EXTENSIONS else None


def read_folder_chunk(files: list[Path], root: Path, source: str) -> Iterator[RawRecord]:
    """Images with their same-stem .txt caption and .json sidecar; a .txt listed on its own (a caption
    whose image is missing) becomes a record dropped as `caption_without_image`."""
    for image_path in files:
        relative = image_path.relative_to(root)
        key = safe_key(source, relative.with_suffix("").as_posix().replace("/", "_"))
        if image_path.suffix == ".txt":
            yield RawRecord(key, source, meta={"path": relative.as_posix()}, read_error="caption_without_image")
            continue
        record = RawRecord(key, source, image_ext=image_path.suffix.lower().lstrip("."),
                           meta={"path": relative.as_posix()})
        try:
            record.image = image_path.read_bytes()
        except OSError:
            record.read_error = "image_file_missing"
        caption_path = image_path.with_suffix(".txt")
        if caption_path.is_file():
            record.caption = caption_path.read_bytes()
        json_path = image_path.with_suffix(".json")
        if json_path.is_file():
            try:
                record.meta.update(json.loads(json_path.read_text()))
            except (ValueError, UnicodeDecodeError):
                record.meta["json_error"] = "sidecar json is not valid JSON"
        yield record


def fingerprint(source: SourceConfig) -> dict[str, Any]:
    """What a source contributes to the ingest cache key: file names relative to the source and their
    contents (or sizes and mtimes with `fingerprint: stat`), never the source's absolute path."""
    roots = source_roots(source)
    if not roots:
        return {"missing": source.path}
    files = _files_under(roots)
    base = roots[0] if len(roots) == 1 and roots[0].is_dir() else None
    if base is None and len(files) > 1:
        base = Path(os.path.commonpath([str(f.parent) for f in files]))
    digest = hashlib.sha256()
    for file in files:
        relative = file.relative_to(base).as_posix() if base is not None else file.name
        digest.update(relative.encode())
        stat = file.stat()
        if source.fingerprint == "stat":
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return {"files": len(files), "digest": digest.hexdigest()[:24]}
