"""The event loop's side of the engine: stream events without blocking the loop.

Operations: `EngineBridge.events(prepared, on_end)` (an async iterator of
StreamEvents; `on_end(result, error)` is called once the engine is done with
the request), `collect_results(streams, request)` (whole answers, given up
when the client disconnects).

Threads: the engine runs every request on its own worker thread, FIFO, so
requests are served in the order they arrive. Here one pump thread per open
stream waits on the engine's iterator and hands events to the loop; the
server never calls the model itself. Disconnects: when the consumer goes
away, the relay cancels the engine's stream (`EventStream.cancel`, thread-safe):
a request still queued never reaches the model, a running one stops at its
next chunk or token. The pump still reads the engine's last event, so
`on_end` gets what really happened (tokens restored, computed, generated,
timings) also for a request whose client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from kvcellar.engine import GenerationResult, StreamEvent
from kvcellar.engine.serving import EventStream, ServingEngine
from kvcellar.server.prepare import Prepared

_END = object()
OnEnd = Callable[[GenerationResult | None, BaseException | None], None]  # (the engine's result, or its error)


class EngineBridge:
    def __init__(self, engine: ServingEngine, max_streams: int) -> None:
        self._engine = engine
        # Past max_streams, pumps wait on this while the engine's queue keeps their events.
        self._slots = threading.BoundedSemaphore(max_streams)

    def events(self, prepared: Prepared, on_end: OnEnd) -> AsyncIterator[StreamEvent]:
        """Queue the request now (so requests queue in arrival order, and a refusal raises here,
        before any response is sent) and return its events; the last one carries `.result`.

        `on_end` runs on the pump thread once the engine finished the request (even when the events'
        consumer left first), before the last event reaches the consumer; it is not called when this
        method raises."""
        iterator = self._engine.stream(prepared=prepared.prompt, params=prepared.params)
        return self._relay(iterator, on_end)

    async def _relay(self, iterator: EventStream, on_end: OnEnd) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        # Daemon threads: a stream still open at exit must not keep the process alive.
        threading.Thread(target=_pump, args=(iterator, loop, inbox, stop, self._slots, on_end), name="kvcellar-stream",
                         daemon=True).start()  # fmt: skip
        try:
            while True:
                item = await inbox.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            iterator.cancel()  # thread-safe: a queued request never reaches the model, a running one stops


def _pump(
    iterator: EventStream, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue, stop: threading.Event,
    slots: threading.BoundedSemaphore, on_end: OnEnd,
) -> None:  # fmt: skip
    def send(item: object) -> None:
        if stop.is_set():  # the consumer left: nobody reads the inbox any more
            return
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown: nobody is listening
            loop.call_soon_threadsafe(inbox.put_nowait, item)

    ended = False

    def end(result: GenerationResult | None, error: BaseException | None) -> None:
        nonlocal ended
        if not ended:
            ended = True
            on_end(result, error)

    slots.acquire()
    try:
        # To the end even after `stop`: the consumer's leaving cancelled the request, so the engine
        # ends it at its next chunk or token with a "cancelled" result that says how far it got.
        for event in iterator:
            if event.result is not None:
                end(event.result, None)  # before the consumer sees the end: a client's answer is already recorded
            send(event)
    except BaseException as exc:  # noqa: BLE001 - the error belongs to the consumer
        end(None, exc)
        send(exc)
    finally:
        iterator.close()  # cancels the request if it has not finished
        slots.release()
        send(_END)
        end(None, None)  # the engine's stream ended with neither a result nor an error


async def _wait_for_disconnect(request: Request) -> None:
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a server that cannot tell us: never report a disconnect
        await asyncio.Event().wait()


async def _last_result(events: AsyncIterator[StreamEvent]) -> GenerationResult | None:
    async for event in events:
        if event.result is not None:
            return event.result
    return None


async def _last_results(streams: list[AsyncIterator[StreamEvent]]) -> list[GenerationResult] | None:
    results = await asyncio.gather(*(_last_result(events) for events in streams))
    return None if any(result is None for result in results) else list(results)


async def collect_results(streams: list[AsyncIterator[StreamEvent]], request: Request) -> list[GenerationResult] | None:
    """The final result of each stream (a request's choices), or None when the client disconnected first
    (the requests are then cancelled)."""
    consumer = asyncio.ensure_future(_last_results(streams))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await consumer
    for events in streams:  # cancel every choice's request now, not when the generators are collected
        with contextlib.suppress(Exception):
            await events.aclose()
    return None
