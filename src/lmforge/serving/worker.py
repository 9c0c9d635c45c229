"""The batching engine on a thread of its own, so generation never blocks the server's event loop.

In: requests from any thread (`submit`, `cancel`). Out: each request's pieces through its
`on_update` callback, called on the worker's thread. Requests beyond the running batch wait in a
bounded queue; past that, `submit` raises `Busy`.
"""
from __future__ import annotations

import queue
import threading

from ..generation import Request, SamplingConfig


class Busy(Exception):
    """The batch and the waiting queue are full."""


class Worker:
    def __init__(self, lm, max_batch: int = 32, max_waiting: int = 64):
        self.engine = lm.engine(max_batch)
        self.engine.contain_errors = True
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._active = 0  # submitted and not yet finished
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    @property
    def load(self) -> dict:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting), "active": self._active}

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, on_update, tail: str = "") -> Request:
        """Queue a request; `on_update(request, piece)` follows it to the end (finish_reason set)."""
        with self._lock:
            if self._active >= self.max_batch + self.max_waiting:
                raise Busy(f"the server is busy: {self.max_batch} requests decoding and {self.max_waiting} "
                           f"waiting; retry shortly")
            self._active += 1

        def update(request: Request, piece: str) -> None:
            if request.finished:
                with self._lock:
                    self._active -= 1
            on_update(request, piece)

        request = Request(list(prompt_ids), sampling, on_update=update, tail=tail)
        self._inbox.put(("submit", request))
        return request

    def cancel(self, request: Request) -> None:
        """The client went away: the request leaves the batch at the next step."""
        self._inbox.put(("cancel", request))

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._take(block=self.engine.idle)
                if not self.engine.idle:
                    self.engine.step()
            except Exception as exc:  # a bug must not take the server down: end what ran, keep serving
                self.engine.fail(f"generation failed ({type(exc).__name__}: {exc})")

    def _take(self, block: bool) -> None:
        """Apply the queued submits and cancels (waiting for one when the engine has nothing to do)."""
        while True:
            try:
                action, request = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if action == "submit":
                self.engine.add(request)
            elif action == "cancel":
                self.engine.cancel(request)
            else:
                return
