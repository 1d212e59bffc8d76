"""The engine's own thread: the one place that calls `Engine.add / step / abort / metrics`.

    loop = EngineLoop(engine)
    loop.start()
    future = loop.submit([request, ...], deliver)   # concurrent Future: None, or RequestError / QueueFull
    loop.abort(request_id)                           # applied before the next step
    loop.stats                                       # the engine's metrics() after the last step, plus tokens/s
    loop.stop()

The engine is not thread-safe, so HTTP handlers never touch it: they post commands on a locked list and the
thread applies them between steps. `deliver(item)` is called on the engine thread with each `Event` of the
submitted requests (and an `EngineFailure` if the engine breaks or stops); the server passes a function that hands
the item to its asyncio loop with `call_soon_threadsafe`. With no work the thread sleeps on a threading.Event.
Torch-free: the engine object is injected (the real one, or tests/fake_engine.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dgemma.params import Event, Request

log = logging.getLogger("dgemma.serve.main")

RATE_WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds


@dataclass
class EngineFailure:
    """Delivered instead of an Event when a request cannot go on: the engine raised, or the server is stopping."""
    message: str
    status: int = 500  # the HTTP status a handler that has not answered yet should use


class EngineLoop:
    def __init__(self, engine, name: str = "dgemma-engine"):
        self.engine = engine
        self.max_model_len = int(engine.max_model_len)
        self._name = name
        self._lock = threading.Lock()
        self._commands: list[tuple] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sinks: dict[str, Callable[[object], None]] = {}  # engine thread only
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self.failures = 0  # engine steps that raised
        self.stats: dict = self._read_stats()  # replaced (never mutated) by the engine thread

    # ---- called from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after the current step; requests still running get an EngineFailure (503)."""
        self._post(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, requests: list[Request], deliver: Callable[[object], None]) -> concurrent.futures.Future:
        """Add all of `requests` or none: the future holds None, or the RequestError / QueueFull of the first
        that failed (those added before it are aborted). `deliver` then receives their events."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("add", requests, deliver, future))
        return future

    def abort(self, request_id: str) -> None:
        """Remove the request from the engine before its next step; no more events are delivered for it."""
        self._post(("abort", request_id))

    def _post(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
            self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    commands, self._commands = self._commands, []
                    if not commands:
                        self._wake.clear()  # under the lock: a command posted after this sets it again
                if any(c[0] == "stop" for c in commands):
                    break
                for command in commands:
                    self._apply(command)
                if self.engine.has_work():
                    self._step()
                elif not commands:
                    self._wake.wait(timeout=1.0)  # wake now and then so tokens/s decays to 0 when idle
                self.stats = self._read_stats()
        except BaseException:  # a broken engine must not leave handlers waiting forever
            log.exception("the engine thread stopped")
        finally:
            self._stopping = True
            with self._lock:
                commands, self._commands = self._commands, []
            for command in commands:  # adds that arrived too late
                if command[0] == "add" and not command[3].done():
                    command[3].set_exception(RuntimeError("the server is stopping"))
            self._fail_all(EngineFailure("the server is stopping", status=503))

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "abort":
            self._sinks.pop(command[1], None)
            self.engine.abort(command[1])
            return
        _, requests, deliver, future = command
        if not future.set_running_or_notify_cancel():
            return
        added = []
        try:
            for request in requests:
                self.engine.add(request)
                added.append(request.request_id)
        except Exception as e:  # noqa: BLE001  RequestError, QueueFull, or an engine bug: the handler answers it
            for request_id in added:
                self.engine.abort(request_id)
            future.set_exception(e)
            return
        for request_id in added:
            self._sinks[request_id] = deliver
        future.set_result(None)

    def _step(self) -> None:
        try:
            events: list[Event] = self.engine.step()
        except Exception as e:
            self.failures += 1
            log.exception("engine step failed; failing its %d requests", len(self._sinks))
            ids = list(self._sinks)
            self._fail_all(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))
            for request_id in ids:
                try:
                    self.engine.abort(request_id)
                except Exception:
                    log.exception("abort of %s after a failed step failed too", request_id)
            if self.engine.has_work():
                time.sleep(0.1)  # a broken engine that keeps work must not spin
            return
        for event in events:
            sink = self._sinks.get(event.request_id)
            if sink is None:  # aborted by the server, or a request it never added
                continue
            if event.finished:
                del self._sinks[event.request_id]
            try:
                sink(event)
            except Exception:  # e.g. the asyncio loop has closed
                log.exception("delivering an event for %s failed", event.request_id)

    def _fail_all(self, failure: EngineFailure) -> None:
        sinks, self._sinks = self._sinks, {}
        for sink in set(sinks.values()):
            try:
                sink(failure)
            except RuntimeError:  # the asyncio loop has closed: nobody is waiting
                log.debug("no one to tell: %s", failure.message)

    def _read_stats(self) -> dict:
        stats = dict(self.engine.metrics())
        now, tokens = time.monotonic(), int(stats.get("tokens", 0))
        self._rate.append((now, tokens))
        while len(self._rate) > 2 and now - self._rate[1][0] > RATE_WINDOW_S:
            self._rate.popleft()
        t0, k0 = self._rate[0]
        stats["tokens_per_s"] = (tokens - k0) / (now - t0) if now - t0 > 1e-3 else 0.0
        stats["engine_failures"] = self.failures
        return stats
