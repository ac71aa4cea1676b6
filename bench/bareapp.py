"""The footprint baseline: a bare Celery app with one task, nothing of Berth's.

    celery -A bench.bareapp worker --pool solo -Q QUEUE
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bare", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_RESULT_BACKEND"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_hijack_root_logger=True)


@app.task(name="bare.ping")
def ping() -> str:
    return "pong"
