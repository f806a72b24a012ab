"""Reading a WebDataset tar as samples: members grouped by key (WebDataset's naming rule), with an
archive that was cut short ending in `TarCut`, which names the sample the cut fell into.

A sample is yielded only once the next sample's first member has begun (or the archive ended
cleanly), so a cut never costs the complete sample before it. A cut inside a member's header reads
to tarfile as a normal end, so an uncompressed archive's size is also checked against where its last
member ends plus the two zero blocks that close every tar.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path


class TarCut(Exception):
    """The archive ends early or is unreadable; `partial_key` is the sample it cut into (None: none began)."""

    def __init__(self, path: Path, partial_key: str | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.partial_key = partial_key


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for every complete sample, in archive order; raises TarCut at a cut."""
    key: str | None = None
    members: dict[str, bytes] = {}
    data_end = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = split_member_name(member.name)
                if key is not None and member_key != key:
                    yield key, members  # complete: the next sample's first member has begun
                    members = {}
                key = member_key
                handle = tar.extractfile(member)
                members[ext] = handle.read() if handle is not None else b""
                if len(members[ext]) != member.size:
                    raise EOFError(f"member {member.name} is cut short")
                data_end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError, OSError) as error:
        raise TarCut(path, key, str(error)) from error
    if key is not None and path.suffix == ".tar" and path.stat().st_size < data_end + 2 * tarfile.BLOCKSIZE:
        raise TarCut(path, key, "no closing tar blocks: the last sample may be partial")
    if key is not None:
        yield key, members
