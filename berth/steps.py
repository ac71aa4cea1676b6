"""Worker steps that run one background thread for the worker's lifetime."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps


class ThreadStep(bootsteps.StartStopStep):
    """A worker step whose daemon thread runs until the worker stops, warm or cold.

    Celery calls a step's `terminate`, not its `stop`, on a cold shutdown and when its test
    worker ends (`celery.contrib.testing.worker`). `StartStopStep.terminate` only reaches a
    service object, which these steps have none of: the thread would go on in a process that
    goes on, such as a test session, and act on the broker for a worker that is gone.
    """

    thread_name = "berth-step"

    def __init__(self, worker: Any, **options: Any) -> None:
        super().__init__(worker, **options)
        self.stopping = threading.Event()

    def run_thread(self, target: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=target, name=self.thread_name, daemon=True)
        thread.start()
        return thread

    def stop(self, worker: Any) -> None:
        self.stopping.set()

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
