"""The controller's work queue: job keys waiting for a reconcile, each once, at its earliest due
time (client-go's delaying queue)."""

from __future__ import annotations

import heapq
import threading
import time


class WorkQueue:
    """Job keys waiting for a reconcile: each key once, at its earliest due time (client-go's
    delaying queue). A key added while it is being processed is processed again after."""

    def __init__(self) -> None:
        self._due: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._cv = threading.Condition()

    def add(self, key: tuple[str, str], delay: float = 0.0) -> None:
        due = time.monotonic() + max(delay, 0.0)
        with self._cv:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, key))
            self._cv.notify()

    def forget(self, key: tuple[str, str]) -> None:
        with self._cv:
            self._due.pop(key, None)

    def get(self, stop: threading.Event) -> tuple[str, str] | None:
        with self._cv:
            while not stop.is_set():
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier add, or forgotten
                if self._heap and self._heap[0][0] <= time.monotonic():
                    _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    return key
                timeout = self._heap[0][0] - time.monotonic() if self._heap else 1.0
                self._cv.wait(min(max(timeout, 0.01), 1.0))
        return None

    def __len__(self) -> int:
        with self._cv:
            return len(self._due)
