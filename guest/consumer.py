"""The guest's worker consumer: a message it cannot accept is dead-lettered, dropped, never retried.

Wired in with ``worker_consumer`` (guest/__init__.py). Celery's own Consumer already drops a
task message it cannot run (``on_unknown_message``, ``on_unknown_task``, ``on_invalid_task``,
``on_decode_error``); this subclass

- first records an entry on the guest's dead-letter list (`guest.deadletters`), then runs
  Celery's handling (reject or ack, signals, the NotRegistered result of an unknown task);
- makes that handling total: a message malformed in a way Celery does not expect (a body that
  is no ``[args, kwargs, embed]`` triple, an unhashable task name or id, ...) used to raise out
  of the handler and stop or restart the consumer; it is dead-lettered and rejected instead;
- guards the transport: an item on ``guest.ID`` that is no kombu envelope at all (not JSON,
  not UTF-8, no properties) made kombu raise inside the event loop and stopped the agent. BRPOP
  has already taken it off the list, so there is nothing to reject: it is dead-lettered;
- keeps message bodies out of the log: Celery quotes up to 1 KiB of a dropped message's body
  (a prepare's passwords); its log lines about dropped messages say ``(body withheld)``.

A dropped message is rejected without requeue (on Redis: removed from the unacked hash), so it
is never redelivered, and the agent goes on serving. Errors of the broker connection itself
are not the message's fault: they pass through to Celery, which reconnects as before.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

import redis
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from celery.worker.consumer import consumer as celery_consumer
from kombu.exceptions import ContentDisallowed, DecodeError

import guest.authn as authn
import guest.deadletters as deadletters
from berth.config import store_url
from berth.tls import redis_from_url
from guest.identity import identity

log = logging.getLogger("berth.guest")

UNDECODABLE = "undecodable"
NO_TASK_HEADER = "no_task_header"
UNKNOWN_TASK = "unknown_task"
INVALID = "invalid"

# Task message protocol 2: what the third item of a body may hold.
EMBED_TYPES: dict[str, type | tuple[type, ...]] = {
    "callbacks": (list, tuple), "errbacks": (list, tuple), "chain": (list, tuple), "chord": dict}
# Set while no envelope has been read in the current BRPOP read.
_UNREAD: Any = object()
_ERROR_LIMIT = 200
# A body shorter than this is not searched for in error texts (it would match by chance).
_MIN_SCRUB = 6


# --- Celery's log lines about dropped messages, without the body ---------------------------

def _body_arguments() -> dict[str, int]:
    """Celery's templates for a dropped message -> the position of the body in their arguments."""
    positions = {"UNKNOWN_FORMAT": 0, "UNKNOWN_TASK_ERROR": 1, "INVALID_TASK_ERROR": 1, "MESSAGE_DECODE_ERROR": 4}
    return {template: index for name, index in positions.items()
            if isinstance(template := getattr(celery_consumer, name, None), str)}


class WithholdBodies(logging.Filter):
    """Replaces the body (``dump_body``) in Celery's reports of dropped messages."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = _body_arguments()

    def filter(self, record: logging.LogRecord) -> bool:
        index = self.positions.get(record.msg) if isinstance(record.msg, str) else None
        if index is None:
            return True
        args = record.args
        if not isinstance(args, tuple) or len(args) <= index:
            return False  # not the shape we know: drop the line rather than risk the body
        # An exception's repr may quote the body too (UnicodeDecodeError holds the bytes): its text.
        record.args = tuple("(body withheld)" if i == index else error_text(arg) if isinstance(arg, BaseException)
                            else arg for i, arg in enumerate(args))
        return True


def withhold_bodies() -> None:
    """Install `WithholdBodies` on Celery's consumer logger (once)."""
    logger = logging.getLogger(celery_consumer.__name__)
    if not any(isinstance(f, WithholdBodies) for f in logger.filters):
        logger.addFilter(WithholdBodies())


# --- What an entry says about a message -----------------------------------------------------

def _short(text: str, limit: int = _ERROR_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(body: object) -> int | None:
    if body is None:
        return 0
    if isinstance(body, (bytes, bytearray, memoryview)):
        return len(body)
    if isinstance(body, str):
        return len(body.encode("utf-8", "surrogatepass"))
    return None


def _body_text(body: object) -> str:
    if isinstance(body, (bytes, bytearray)):
        return bytes(body).decode("utf-8", "replace")
    return body if isinstance(body, str) else ""


def error_text(exc: BaseException, body: object = None) -> str:
    """A short, one-line description of exc that never quotes the body."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    quoted = _body_text(body)
    if len(quoted) >= _MIN_SCRUB and quoted in text:
        text = text.replace(quoted, "(body withheld)")
    return _short(text)


def message_fields(message: Any) -> dict[str, Any]:
    """task, id, content type and body size of a kombu message, from its headers; never the body."""
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    return {"task": headers.get("task"), "id": headers.get("id"),
            "content_type": getattr(message, "content_type", None), "size": _size(getattr(message, "body", None))}


def envelope_fields(envelope: object) -> dict[str, Any]:
    """The same, best effort, from a raw kombu envelope (a dict read off the list) kombu refused."""
    if not isinstance(envelope, dict):
        return {"task": None, "id": None, "content_type": None, "size": None}
    headers = envelope.get("headers")
    headers = headers if isinstance(headers, dict) else {}
    properties = envelope.get("properties")
    body = envelope.get("body")
    size: int | None = None
    if isinstance(body, str):
        size = len(body.encode("utf-8", "surrogatepass"))
        if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
            try:
                size = len(base64.b64decode(body, validate=False))
            except ValueError:
                pass
    return {"task": headers.get("task"), "id": headers.get("id"),
            "content_type": envelope.get("content-type"), "size": size}


def envelope_error(exc: BaseException) -> str:
    """Why kombu could not read an envelope; quotes nothing of it."""
    if isinstance(exc, json.JSONDecodeError):
        return _short(f"not JSON: {exc.msg} at char {exc.pos}")
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return f"not a kombu message envelope ({type(exc).__name__})"


def raw_size(exc: BaseException) -> int | None:
    """The size of an item that could not be parsed, from the parser's error."""
    if isinstance(exc, json.JSONDecodeError):
        return len(exc.doc.encode("utf-8", "surrogatepass"))
    if isinstance(exc, UnicodeDecodeError):
        return len(exc.object)
    return None


def triple_problem(payload: object) -> str | None:
    """What is wrong with a protocol-2 body, which Celery unpacks only when the task runs."""
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        return "the body is not an [args, kwargs, embed] triple"
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        return "args in the body is not a list"
    if not isinstance(kwargs, dict):
        return "kwargs in the body is not an object"
    if embed is None:
        return None
    if not isinstance(embed, dict):
        return "embed in the body is not an object"
    # Celery merges embed into the task's request: anything but these four would overwrite it
    # (its id, say, and so where its result goes).
    for key, value in embed.items():
        if key not in EMBED_TYPES:
            return "embed in the body holds more than callbacks, errbacks, chain and chord"
        if value is not None and not isinstance(value, EMBED_TYPES[key]):
            return f"{key} in the body's embed is not {'an object' if key == 'chord' else 'a list'}"
    return None


def _task_and_id(message: Any) -> tuple[Any, Any]:
    fields = message_fields(message)
    return fields["task"], fields["id"]


def reason_for(exc: BaseException) -> str:
    return UNDECODABLE if isinstance(exc, (DecodeError, ContentDisallowed, UnicodeError)) else INVALID


# --- The consumer ------------------------------------------------------------------------------

class DeadLetteringConsumer(celery_consumer.Consumer):
    """Celery's worker Consumer that dead-letters what it drops and never dies of a bad message."""

    # Errors of the broker connection, not of a message: these go on to Celery (it reconnects).
    # kombu counts KeyError among the Redis transport's connection errors: not here, a
    # malformed message raises KeyError too.
    broker_errors: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError,
                                                      redis.exceptions.TimeoutError, OSError)
    _recorded: Any = None  # the last message dead-lettered (a reference, so it is one entry)
    _envelope: Any = _UNREAD
    _client: redis.Redis | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        withhold_bodies()

    # Celery's handlers: record, then Celery's behaviour, then make sure the message is gone.

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._drop(message, NO_TASK_HEADER, "the message names no task (no 'task' header)",
                   super().on_unknown_message, body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = message_fields(message)["task"]
        self._drop(message, UNKNOWN_TASK, _short(f"task {name!r} is not registered on this guest"),
                   super().on_unknown_task, body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._drop(message, reason_for(exc), error_text(exc, getattr(message, "body", None)),
                   super().on_invalid_task, body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._drop(message, UNDECODABLE, error_text(exc, getattr(message, "body", None)),
                   super().on_decode_error, message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            try:
                refusal = self._refusal(message)
                if refusal is not None:
                    return self._refuse(message, refusal)
                problem = self._body_problem(message)
                if problem is None:
                    return handle(message)
                try:
                    raise InvalidTaskError(problem)
                except InvalidTaskError as exc:  # raised, so that Celery's report has its traceback
                    return self.on_invalid_task(None, message, exc)
            except redis.exceptions.NoPermissionError as exc:
                # The broker refused a write this message asked for (another guest's key, say):
                # the message's fault, not the connection's. Without this, Celery would stop.
                self._forget_requests(message)
                self._drop(message, INVALID, _short(f"the broker refused it a write: {exc}"), None)
                return None
            except self._passthrough():
                raise
            except Exception as exc:  # noqa: BLE001 - any other failure is the message's: drop it
                self._forget_requests(message)
                log.error("could not handle a message: %s", error_text(exc, getattr(message, "body", None)),
                          exc_info=True)
                self._drop(message, reason_for(exc), error_text(exc, getattr(message, "body", None)), None)
                return None

        return on_task_received

    def connect(self) -> Any:
        conn = super().connect()
        self._guard_transport(conn)
        return conn

    # Internals.

    def _passthrough(self) -> tuple[type[BaseException], ...]:
        return (*self.broker_errors, redis.exceptions.ResponseError)

    def _refusal(self, message: Any) -> authn.Refusal | None:
        """Why this guest does not believe the message (guest/authn.py), or None.

        A message without a task header or with a body that cannot be decoded is left to
        Celery's handlers below, which drop it, unless its body names a task: Celery would run
        that (task message protocol 1), and nothing the taskmanager sends looks like it.
        """
        headers = message.headers
        try:
            payload = message.payload
        except Exception:  # noqa: BLE001 - Celery reports it: on_decode_error / on_invalid_task
            return None
        if not isinstance(headers, dict) or "task" not in headers:
            if isinstance(payload, dict) and "task" in payload:
                return authn.Refusal(authn.UNSIGNED, "a task named in the body (protocol 1): never signed")
            return None
        me = identity()
        return authn.check(headers, payload, instance_id=me.instance_id, key=me.key, spent=me.spent)

    def _refuse(self, message: Any, refusal: authn.Refusal) -> None:
        if refusal.reason in authn.QUIET:
            # Normal (a late guest's missed pings, a redelivery after a lost ack): no dead letter.
            log.info("refused a message on guest.%s (%s: %s): task %r, id %r; dropped",
                     self.app.conf.berth_instance_id, refusal.reason, refusal.error, *_task_and_id(message))
            self._reject(message)
            return
        self._drop(message, refusal.reason, refusal.error, None)

    def _body_problem(self, message: Any) -> str | None:
        """What is wrong with the body of a message for a known task, checked before Celery sees it.

        Celery unpacks a protocol-2 body only while it builds the request and again in the pool,
        where a bad one raises out of the consumer instead of being reported as invalid.
        """
        headers = message.headers
        name = headers.get("task") if isinstance(headers, dict) else None
        if not isinstance(name, str) or name not in self.strategies:
            return None  # Celery reports these (no task header, unknown task)
        try:
            payload = message.payload
        except Exception:  # noqa: BLE001 - Celery reports it: on_decode_error / on_invalid_task
            return None
        if isinstance(payload, dict) and "args" in payload:
            return None  # a hybrid protocol 1/2 message: Celery checks it itself
        return triple_problem(payload)

    def _drop(self, message: Any, reason: str, error: str, original: Callable[..., Any] | None,
              *args: Any) -> None:
        if self._recorded is not message:
            self._recorded = message
            self._record({"reason": reason, "error": error, **message_fields(message)})
        if original is not None:
            try:
                original(*args)
            except redis.exceptions.NoPermissionError as exc:
                log.warning("Celery's handling of the dropped message was refused by the broker (%s); "
                            "rejecting it", exc)
            except self._passthrough():
                raise
            except Exception as exc:  # noqa: BLE001 - the message is dropped all the same
                # E.g. an unknown task without an id: Celery looks for one in the body and fails.
                log.warning("Celery's handling of the dropped message failed too (%s); rejecting it",
                            error_text(exc, getattr(message, "body", None)))
        self._reject(message)

    def _reject(self, message: Any) -> None:
        """Reject without requeue unless Celery has already acked or rejected it."""
        try:
            if not message.acknowledged:
                message.reject(requeue=False)
        except self._passthrough():
            raise
        except Exception:  # noqa: BLE001 - nothing more can be done with it
            log.exception("could not reject a dropped message")

    @staticmethod
    def _forget_requests(message: Any) -> None:
        """Take a request Celery registered for a message it then failed on out of worker state."""
        for request in [*worker_state.active_requests, *worker_state.reserved_requests]:
            if getattr(request, "message", None) is message:
                worker_state.task_ready(request)

    def _record(self, fields: dict[str, Any]) -> None:
        """Log the drop and push its entry; a failure to push is logged, never raised."""
        instance_id = self.app.conf.berth_instance_id
        entry = deadletters.normalise({**fields, "received_at": time.time()})
        log.warning("dropped a message on guest.%s (%s: %s): task %r, id %r, content type %r, %s bytes; "
                    "dead-lettered, never redelivered", instance_id, entry["reason"], entry["error"],
                    entry["task"], entry["id"], entry["content_type"], entry["size"])
        if not instance_id:
            log.error("this guest has no instance id: the dead-letter entry is only in this log")
            return
        try:
            if self._client is None:
                self._client = redis_from_url(store_url(self.app.conf.broker_url, self.app.conf.result_backend),
                                                    socket_connect_timeout=2.0,
                                                    socket_timeout=5.0)
            deadletters.push(self._client, instance_id, entry)
        except Exception:  # noqa: BLE001 - the log above keeps it when the broker cannot
            log.exception("could not write the dead-letter entry for guest.%s", instance_id)

    def _guard_transport(self, conn: Any) -> None:
        """Dead-letter an item of the queue that kombu's Redis transport cannot read at all.

        kombu reads it (BRPOP, which takes it off the list), parses the JSON envelope and builds
        a Message before any of Celery's handlers sees it; an error there escapes the event loop.
        """
        channel = conn.default_channel
        handlers: Any = getattr(channel, "handlers", None)
        transport = getattr(channel, "connection", None)
        read = handlers.get("BRPOP") if isinstance(handlers, dict) else None
        if read is None and getattr(conn.transport, "driver_type", None) == "amqp":
            return  # AMQP frames the envelope itself: an undecodable body reaches on_decode_error
        if read is None or transport is None or not hasattr(transport, "_deliver"):
            log.warning("broker transport %s is not kombu's Redis: unreadable messages are not dead-lettered",
                        type(transport).__name__)
            return
        if getattr(read, "berth_guard", False):
            return
        deliver = transport._deliver
        connection_errors = tuple(conn.connection_errors)

        def deliver_envelope(envelope: Any, queue: Any) -> Any:
            self._envelope = envelope
            return deliver(envelope, queue)

        def guarded_read(**options: Any) -> Any:
            self._envelope = _UNREAD
            try:
                return read(**options)
            except Empty:
                raise
            except Exception as exc:
                envelope = self._envelope
                # Before an envelope was read, anything kombu calls a connection error is one.
                if isinstance(exc, self._passthrough()) or (envelope is _UNREAD
                                                              and isinstance(exc, connection_errors)):
                    raise
                self._drop_envelope(exc, None if envelope is _UNREAD else envelope)
                return True
            finally:
                self._envelope = _UNREAD

        guarded_read.berth_guard = True  # type: ignore[attr-defined]
        handlers["BRPOP"] = guarded_read
        transport._deliver = deliver_envelope

    def _drop_envelope(self, exc: Exception, envelope: Any) -> None:
        fields = envelope_fields(envelope)
        if envelope is None:
            fields["size"] = raw_size(exc)
        self._record({"reason": UNDECODABLE, "error": envelope_error(exc), **fields})


__all__ = ["DeadLetteringConsumer", "WithholdBodies", "error_text", "triple_problem"]
