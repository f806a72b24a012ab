"""The ingress's in-flight request places are given back however a streamed answer ends: sent in full,
or abandoned by a client that left before the first byte (no Ray needed: the ASGI response alone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from components.serve.app import _Slot, _SlotStreamingResponse


async def chunks() -> AsyncIterator[bytes]:
    for index in range(3):
        await asyncio.sleep(0.01)
        yield f"data: {index}\n\n".encode()


def serve_once(disconnect_at_once: bool) -> tuple[int, list[dict[str, Any]]]:
    ingress = SimpleNamespace(pending=0)
    slot = _Slot(ingress)
    assert ingress.pending == 1
    response = _SlotStreamingResponse(chunks(), slot, media_type="text/event-stream")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if disconnect_at_once:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "headers": []}
    asyncio.run(response(scope, receive, send))
    return ingress.pending, sent


def test_a_stream_sent_in_full_gives_its_place_back() -> None:
    pending, sent = serve_once(disconnect_at_once=False)
    assert pending == 0
    assert b"".join(m.get("body", b"") for m in sent) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_a_stream_abandoned_before_its_first_byte_gives_its_place_back() -> None:
    pending, _ = serve_once(disconnect_at_once=True)
    assert pending == 0


def test_a_place_is_released_once() -> None:
    ingress = SimpleNamespace(pending=1)
    slot = _Slot(ingress)
    slot.release()
    slot.release()
    assert ingress.pending == 1
