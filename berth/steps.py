"""Worker steps that run one background thread for the worker's lifetime."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps

log = logging.getLogger("berth.threads")
# Seconds before a thread whose body failed or returned early runs it again.
RESTART_AFTER_S = 1.0
THREAD_PREFIX = "berth-"


class ThreadStep(bootsteps.StartStopStep):
    """A worker step whose daemon thread runs until the worker stops, warm or cold.

    The thread survives anything its body raises: it logs the failure and runs the body again
    a moment later, so no one bad input (a guest's, say) stops a taskmanager's background work.

    Celery calls a step's `terminate`, not its `stop`, on a cold shutdown and when its test
    worker ends (`celery.contrib.testing.worker`). `StartStopStep.terminate` only reaches a
    service object, which these steps have none of: the thread would go on in a process that
    goes on, such as a test session, and act on the broker for a worker that is gone.
    """

    thread_name = "berth-step"

    def __init__(self, worker: Any, **options: Any) -> None:
        super().__init__(worker, **options)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def run_thread(self, target: Callable[[], None]) -> threading.Thread:
        self.thread = threading.Thread(target=self._supervised, args=(target,), name=self.thread_name, daemon=True)
        self.thread.start()
        return self.thread

    def _supervised(self, target: Callable[[], None]) -> None:
        while not self.stopping.is_set():
            try:
                target()
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("thread %s failed; it runs again in %g s", self.thread_name, RESTART_AFTER_S)
            else:
                if not self.stopping.is_set():
                    log.error("thread %s ended on its own; it runs again in %g s", self.thread_name,
                              RESTART_AFTER_S)
            self.stopping.wait(RESTART_AFTER_S)

    def stop(self, worker: Any) -> None:
        self.stopping.set()

    def terminate(self, worker: Any) -> None:
        self.stop(worker)


def berth_thread_names() -> list[str]:
    """The names of this process's live Berth background threads."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive())
