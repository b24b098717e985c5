"""How an engine replica sends a streamed answer on (serve/rayllm.py): the first chunk alone
and at once, the rest in Ray Serve LLM's batches — with Ray Serve LLM's own Batcher, on a
simulated engine stream (timing only; the served path is covered by test_serving.py)."""

from __future__ import annotations

import asyncio
import time

from slimserve.serve.rayllm import first_chunk_at_once


async def engine(n: int, every_s: float, closed: list):
    try:
        for i in range(n):
            await asyncio.sleep(every_s)
            yield f"token{i}"
    finally:
        closed.append(True)


async def collect(interval_ms: float, n: int = 12, every_s: float = 0.01):
    closed: list = []
    t0 = time.monotonic()
    out = []
    async for batch in first_chunk_at_once(engine(n, every_s, closed), interval_ms):
        out.append((time.monotonic() - t0, batch))
    return out, closed


def test_first_chunk_leaves_alone_and_at_once_then_batches():
    out, closed = asyncio.run(collect(interval_ms=50))
    first_t, first = out[0]
    assert first == ["token0"] and first_t < 0.04  # Ray Serve LLM alone would hold it ~50 ms
    rest = [b for _, b in out[1:]]
    assert [t for b in [first, *rest] for t in b] == [f"token{i}" for i in range(12)]  # all, in order
    assert len(rest) < 11 and max(len(b) for b in rest) > 1  # batched: fewer messages than tokens
    assert closed == [True]


def test_interval_zero_sends_every_chunk_alone():
    out, _ = asyncio.run(collect(interval_ms=0, n=5))
    assert [b for _, b in out] == [[f"token{i}"] for i in range(5)]


def test_an_empty_stream_sends_nothing():
    out, closed = asyncio.run(collect(interval_ms=50, n=0))
    assert out == [] and closed == [True]


def test_a_client_leaving_before_the_second_chunk_closes_the_engine_stream():
    async def go():
        closed: list = []
        stream = first_chunk_at_once(engine(5, 0.01, closed), 50)
        assert await anext(stream) == ["token0"]
        await stream.aclose()  # what Ray does when the client goes away
        return closed

    assert asyncio.run(go()) == [True]
