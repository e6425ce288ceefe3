"""The agent's live event stream (``GET /api/events``, Server-Sent Events).

Publishing is a no-op when nobody listens.  Each listener has a bounded queue; when
it falls behind, events are dropped and the listener is told how many with a
``dropped`` event, so a slow reader never slows the data path nor grows memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

QUEUE_MAX = 2048


class Subscription:
    __slots__ = ("dropped", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue(QUEUE_MAX)
        self.dropped = 0

    def offer(self, name: str, data: dict) -> None:
        try:
            self.queue.put_nowait((name, data))
        except asyncio.QueueFull:
            self.dropped += 1


class EventHub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def publish(self, name: str, data: dict) -> None:
        for s in self._subs:
            s.offer(name, data)

    async def stream(self, hello: dict, heartbeat: float = 15.0) -> AsyncIterator[bytes]:
        """Yield SSE-encoded events for one listener until it goes away."""
        sub = Subscription()
        self._subs.add(sub)
        try:
            yield _sse("hello", hello)
            while True:
                if sub.dropped:
                    n, sub.dropped = sub.dropped, 0
                    yield _sse("dropped", {"count": n})
                try:
                    name, data = await asyncio.wait_for(sub.queue.get(), heartbeat)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield _sse(name, data)
        finally:
            self._subs.discard(sub)


def _sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
