"""Work a request hands off so that its answer neither waits for it nor is timed by it.

``/forgot-password`` answers before it looks the account up: whatever the lookup finds (an
account, a disabled one, none, one past its hourly limit of mails) is done here afterwards, so
the answer takes the same time for every login and says nothing about which exist.

One thread per process, started on first use (after gunicorn forks). At most ``limit`` tasks
wait at a time, so a flood of requests holds no more memory than that: past it, a request is
503 at once, whatever it asks. (Waiting for a place instead would time the answer by the task
that frees it, one the same client may have sent earlier.)
"""

from __future__ import annotations

import logging
import threading
import typing as t
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor

from .errors import ServiceUnavailable

log = logging.getLogger("headlesskey.background")


class Background:
    def __init__(self, name: str = "hk-background", limit: int = 256, wait: float = 0) -> None:
        self.name = name
        self.wait_for_place = wait
        self._places = threading.BoundedSemaphore(limit)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, task: t.Callable[..., None], *args: t.Any) -> Future[None]:
        """Run ``task(*args)`` on the background thread; 503 if no place is free (within
        ``wait`` seconds)."""
        wait = self.wait_for_place
        if not (self._places.acquire(timeout=wait) if wait > 0
                else self._places.acquire(blocking=False)):
            raise ServiceUnavailable("Too many requests are waiting; try again shortly.")
        try:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1,
                                                        thread_name_prefix=self.name)
                return self._executor.submit(self._run, task, args)
        except BaseException:
            self._places.release()
            raise

    def _run(self, task: t.Callable[..., None], args: tuple[t.Any, ...]) -> None:
        try:
            task(*args)
        except Exception:
            log.exception("background task %s failed", getattr(task, "__name__", task))
        finally:
            self._places.release()

    def drain(self, timeout: float = 30) -> None:
        """Wait until every task submitted so far has run (tests; an orderly shutdown)."""
        with self._lock:
            executor = self._executor
        if executor is not None:
            executor.submit(lambda: None).result(timeout=timeout)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the thread once the tasks submitted so far have run (``wait``)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait)
