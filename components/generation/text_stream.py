"""Generated token ids to streamed text for one request: the reasoning/content split at the think
markers, incremental detokenization that never emits half a UTF-8 character, and OpenAI stop strings.

Per request, the caller routes each id with one ReasoningSplitter, keeps one IncrementalDecoder per
channel (so the bytes of reasoning and content never mix), and runs the content text through a
StopMatcher; at the end it flushes the decoders, then the matcher.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

REASONING = "reasoning"
CONTENT = "content"
REPLACEMENT_CHAR = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


class Decodes(Protocol):
    """The part of a Hugging Face tokenizer the decoder uses."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...,
               clean_up_tokenization_spaces: bool | None = ...) -> str: ...


class ReasoningSplitter:
    """Routes generated token ids to the reasoning or the content channel: ids between a <think> id and
    the next </think> id are reasoning, all others content; the marker ids themselves are dropped."""

    def __init__(self, think_start_id: int | None, think_end_id: int | None) -> None:
        self._start = think_start_id
        self._end = think_end_id
        self._in_reasoning = False

    @property
    def in_reasoning(self) -> bool:
        """Whether a <think> is open (the next id would be reasoning)."""
        return self._in_reasoning

    def channel(self, token_id: int) -> str | None:
        """"reasoning", "content", or None for a marker (a stray </think> included)."""
        if self._start is not None and token_id == self._start:
            self._in_reasoning = True
            return None
        if self._end is not None and token_id == self._end:
            self._in_reasoning = False
            return None
        return REASONING if self._in_reasoning else CONTENT


class IncrementalDecoder:
    """Decodes a growing list of ids and returns only the newly final text: holds back text ending in
    U+FFFD (an incomplete UTF-8 sequence of byte-level BPE).

    Sliding window, as vLLM's and TGI's detokenizers: each push decodes only the ids from
    `_prefix_offset` (the start of the last released piece, kept as context so tokenizers that drop a
    leading space decode the same) and releases the text past `_read_offset`, so a long output costs
    O(n) decoding, not O(n^2)."""

    def __init__(self, tokenizer: Decodes, skip_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._skip_ids = frozenset(skip_ids)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: the first id of the last released piece
        self._read_offset = 0  # ids before this are released as text

    def push(self, token_id: int) -> str:
        """The text that `token_id` makes final ("" while a character is incomplete, or for a skip id)."""
        if token_id in self._skip_ids:
            return ""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete sequence decodes to U+FFFD, as a full decode would)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class StopMatcher:
    """OpenAI `stop` strings over streamed text: releases text that cannot be the start of a stop
    string, and reports when one is hit (the stop string and everything after it are dropped).

    The stream stops at the first stop string to complete (the longest one when several end at the
    same character), so the result does not depend on how the text was cut into pieces."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not isinstance(stop, str) or not stop for stop in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self._stops = tuple(stops)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, stopped); after a stop every push gives ("", True)."""
        if self._stopped:
            return "", True
        buffer = self._held + text
        hit = self._first_stop(buffer)
        if hit is not None:
            self._stopped = True
            self._held = ""
            return buffer[:hit], True
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text at the end (no stop hit); "" after a stop."""
        text, self._held = self._held, ""
        return text

    def _first_stop(self, buffer: str) -> int | None:
        """Where the first stop string to complete in `buffer` starts, or None."""
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _partial_stop_length(self, buffer: str) -> int:
        """The length of the longest suffix of `buffer` that begins some stop string."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            suffix = buffer[len(buffer) - length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
