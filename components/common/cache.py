"""The content-addressed artifact store: one folder per (component, cache key), published atomically.

A stage writes into a private staging folder; on success the manifest is written last and the whole
folder is renamed into place in one step. A folder without its manifest, or whose manifest lists a
file that is missing or has another size, is a cache miss. Staging folders left by a killed run are
removed the next time anyone stages that component (their owner process is gone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "_MANIFEST.json"
STAGING_PREFIX = ".staging-"


@dataclasses.dataclass
class Manifest:
    component: str
    version: str
    cache_key: str
    key_material: dict[str, Any]
    outputs: dict[str, str]  # output name -> path relative to the entry folder
    files: dict[str, int]  # every published file (relative path) -> size in bytes
    metrics: dict[str, float]
    created_at: float
    duration_s: float
    artifacts: list[str] = dataclasses.field(default_factory=list)  # files worth logging to MLflow
    run_id: str = ""  # the MLflow run that produced the entry ('' when untracked): cache hits link to it

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text()))


class ArtifactCache:
    """`<root>/<component>/<key>/` folders holding a stage's named outputs and its manifest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, component: str, key: str) -> Path:
        return self.root / component / key

    def lookup(self, component: str, key: str) -> Manifest | None:
        """The manifest of a complete entry, or None (missing, unfinished, or a file gone)."""
        folder = self.entry(component, key)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = Manifest.from_file(manifest_path)
        except (ValueError, TypeError, OSError):
            return None
        for relative, size in manifest.files.items():
            file = folder / relative
            if not file.is_file() or file.stat().st_size != size:
                return None
        return manifest

    @contextlib.contextmanager
    def staging(self, component: str, key: str) -> Iterator[Path]:
        """A fresh private folder for one attempt; removed if the attempt raises."""
        parent = self.root / component
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_staging(parent)
        folder = parent / f"{STAGING_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def publish(self, staged: Path, manifest: Manifest) -> Path:
        return publish_folder(staged, self.entry(manifest.component, manifest.cache_key), manifest)


def publish_folder(staged: Path, final: Path, manifest: Manifest) -> Path:
    """Write the manifest last, then move the staged folder into place (replacing an old one)."""
    manifest.files = list_files(staged)
    (staged / (MANIFEST + ".tmp")).write_text(manifest.to_json())
    os.replace(staged / (MANIFEST + ".tmp"), staged / MANIFEST)
    if final.exists():  # --force or an explicit output folder: retire the old one first
        retired = final.with_name(f"{STAGING_PREFIX}retired-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, retired)
        shutil.rmtree(retired, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    return final


def list_files(folder: Path) -> dict[str, int]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, MANIFEST + ".tmp"):
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def remove_abandoned_staging(parent: Path) -> list[Path]:
    """Delete staging folders whose writer process no longer runs (a killed or crashed stage)."""
    removed = []
    for folder in parent.glob(f"{STAGING_PREFIX}*"):
        owner = _owner_pid(folder.name)
        if owner is None or not pid_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _owner_pid(name: str) -> int | None:
    parts = name[len(STAGING_PREFIX):].split("-")
    try:
        return int(parts[-2])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to `path` via a temp file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
