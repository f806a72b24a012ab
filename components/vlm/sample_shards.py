"""Writing samples back out as WebDataset shards, for the steps that derive training data from the curated
shards (the SFT conversations, the rejection-sampled answers): members as they were read plus a new json,
`<prefix>-NNNNNN.tar` files of at most `samples_per_shard` samples, each written under a temporary name and
renamed into place, so a killed step leaves no partial shard behind."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

from components.training.shards import RawSample


def write_samples(path: Path, samples: list[RawSample]) -> int:
    """One shard of `samples` (members in a stable order), atomically; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(sample.members):
                payload = sample.members[ext]
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    tmp.replace(path)
    return path.stat().st_size


class ShardWriter:
    """Samples into `folder/<prefix>-NNNNNN.tar`, a new shard every `samples_per_shard` samples."""

    def __init__(self, folder: Path, prefix: str, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.folder, self.prefix, self.per_shard = Path(folder), prefix, samples_per_shard
        self.pending: list[RawSample] = []
        self.shards: list[Path] = []

    def add(self, sample: RawSample) -> None:
        self.pending.append(sample)
        if len(self.pending) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            path = self.folder / f"{self.prefix}-{len(self.shards):06d}.tar"
            write_samples(path, self.pending)
            self.shards.append(path)
            self.pending = []

    def close(self) -> list[Path]:
        self.flush()
        return self.shards
