"""A guest drops what it cannot accept: dead-lettered, never redelivered, and it goes on serving.

Raw items are pushed onto the Redis list ``guest.ID`` the way kombu's Redis transport puts a
message there (``LPUSH`` of a JSON envelope whose body is base64; the guest ``BRPOP``s it). The
envelopes start from a genuine one: a ping published with `queues.publish` to a queue no guest
consumes, read back with ``LRANGE``.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import itertools
import json
import pickle
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.brokers.redis import queues
from berth.ids import binding_keys, deadletter_key, guest_queue, queue_lists, result_key, unacked_keys
from berth.keys import SIGNATURE_HEADER
from guest import deadletters
from tasks.runtime import redis_client, result_client
from tests.helpers import (
    Envelope,
    Proc,
    celery_body,
    guest_identity,
    push_envelope,
    send_to_guest,
    unique_id,
    wait_until,
)

ENTRY_FIELDS = {"reason", "error", "task", "id", "content_type", "size", "received_at"}


def later(seconds: float = 60) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def genuine() -> Iterator[Envelope]:
    """The envelope kombu writes for a guest.ping, from a queue nobody consumes."""
    client = redis_client()
    instance_id = unique_id("tpl")
    queues.declare(redis_client(), instance_id)
    send_to_guest(instance_id, "guest.ping", "ping0.tpl")
    items = client.lrange(guest_queue(instance_id), 0, -1)
    assert len(items) == 1
    yield json.loads(items[0])
    client.delete(*queue_lists(instance_id), *binding_keys(instance_id))


def envelope(genuine: Envelope, instance_id: str, body: bytes, *, task: object = "guest.ping",
             task_id: object = None, content_type: str | None = "application/json",
             drop: tuple[str, ...] = ()) -> Envelope:
    """A copy of the genuine envelope with another body, task, id and content type.

    Each gets its own delivery tag, as kombu gives every message; ``drop`` removes headers. It is
    signed for the guest as the taskmanager would sign it, where there is something to sign (a
    JSON body and a task name): what is wrong with it is then its content, not its origin.
    """
    message = copy.deepcopy(genuine)
    headers = message["headers"]
    headers.update(task=task, id=task_id, root_id=task_id, expires=later().isoformat(), argsrepr="()",
                   kwargsrepr="{}")
    headers.pop(SIGNATURE_HEADER, None)
    try:
        payload = json.loads(body)
        if content_type == "application/json" and isinstance(task, str) and isinstance(task_id, str):
            headers[SIGNATURE_HEADER] = guest_identity(instance_id)[1].sign(
                instance_id=instance_id, headers=headers, body=payload)
    except ValueError:
        pass  # nothing a taskmanager would sign: not JSON, or no JSON value (Infinity)
    for name in drop:
        headers.pop(name, None)
    message["body"] = base64.b64encode(body).decode()
    message["content-type"] = content_type
    message["properties"].update(delivery_tag=str(uuid.uuid4()), correlation_id=task_id)
    message["properties"]["delivery_info"]["routing_key"] = guest_queue(instance_id)
    return message


push = push_envelope


def ping(instance_id: str, name: str) -> Any:
    return send_to_guest(instance_id, "guest.ping", name)


def nothing_held(client: redis.Redis, instance_id: str) -> bool:
    """No message left in the queue's lists, none taken and unacknowledged."""
    keys = unacked_keys(instance_id)
    return (sum(int(client.llen(name)) for name in queue_lists(instance_id)) == 0
            and int(client.hlen(keys["unacked_key"])) == 0 and int(client.zcard(keys["unacked_index_key"])) == 0)


def running_guest(instance_id: str, start_guest: Callable[[str], Proc]) -> Proc:
    queues.declare(redis_client(), instance_id)
    guest = start_guest(instance_id)
    wait_until(lambda: " ready." in guest.log() or not guest.alive(), 30, message="guest ready")
    assert guest.alive(), guest.log()
    return guest


def test_each_kind_of_bad_message_is_dead_lettered_with_its_reason_and_the_guest_goes_on(
        genuine: Envelope, new_id: Callable[[str], str], start_guest: Callable[[str], Proc]) -> None:
    client = redis_client()
    instance_id = new_id("bad")
    guest = running_guest(instance_id, start_guest)
    secret = f"pw-{uuid.uuid4().hex}"  # in every body: no entry and no log line may show it
    not_json = b"\x00\x01 this is not JSON at all: password=" + secret.encode()
    bodies = {
        "pickle": pickle.dumps(([], {"instance_id": instance_id, "password": secret}, {})),
        "unknown": celery_body(kwargs={"instance_id": instance_id, "password": secret}),
        "no_task": celery_body(kwargs={"instance_id": instance_id, "password": secret}),
        "not_triple": json.dumps({"instance_id": instance_id, "password": secret}).encode(),
    }
    messages = {
        "pickle": envelope(genuine, instance_id, bodies["pickle"], task_id=f"{instance_id}.guest.pickle",
                           content_type="application/x-python-serialize"),
        "unknown": envelope(genuine, instance_id, bodies["unknown"], task="guest.nope",
                            task_id=f"{instance_id}.guest.unknown"),
        "no_task": envelope(genuine, instance_id, bodies["no_task"], task_id=f"{instance_id}.guest.no_task",
                            drop=("task",)),
        "not_triple": envelope(genuine, instance_id, bodies["not_triple"], task_id=f"{instance_id}.guest.not_triple"),
    }
    push(client, instance_id, not_json)
    for message in messages.values():
        push(client, instance_id, message)

    answer = ping(instance_id, "after").get(timeout=20)
    assert answer["instance_id"] == instance_id, "the guest still serves after five bad messages"

    entries = deadletters.read(client, instance_id)
    assert len(entries) == 5, entries
    by_id = {entry["id"]: entry for entry in entries}
    expected = {None: "undecodable", f"{instance_id}.guest.pickle": "undecodable",
                f"{instance_id}.guest.unknown": "unknown_task", f"{instance_id}.guest.no_task": "no_task_header",
                f"{instance_id}.guest.not_triple": "invalid"}
    assert {key: entry["reason"] for key, entry in by_id.items()} == expected
    assert by_id[None]["size"] == len(not_json) and by_id[None]["task"] is None
    for name, message in messages.items():
        entry = by_id[message["headers"]["id"]]
        assert entry["size"] == len(bodies[name]), name
        assert entry["content_type"] == message["content-type"], name
    assert by_id[f"{instance_id}.guest.unknown"]["task"] == "guest.nope"
    assert by_id[f"{instance_id}.guest.not_triple"]["task"] == "guest.ping"
    assert by_id[f"{instance_id}.guest.no_task"]["task"] is None
    for entry in entries:
        assert set(entry) == ENTRY_FIELDS and entry["error"] and isinstance(entry["received_at"], float)
        stored = json.dumps(entry)
        assert secret not in stored and "password" not in stored, entry
        assert not any(base64.b64encode(body).decode() in stored for body in bodies.values())
    assert [e["id"] for e in entries] == [m["headers"]["id"] for m in reversed(messages.values())] + [None], \
        "newest first"

    wait_until(lambda: nothing_held(client, instance_id), 10, message="queue and unacked keys empty")
    assert secret not in guest.log(), "Celery's report of a dropped message withholds its body"
    assert "(body withheld)" in guest.log()
    assert guest.alive()


def test_a_dead_letter_that_cannot_be_written_is_logged_and_the_message_dropped_all_the_same(
        genuine: Envelope, new_id: Callable[[str], str], start_guest: Callable[[str], Proc]) -> None:
    client = redis_client()
    instance_id = new_id("nodl")
    client.set(deadletter_key(instance_id), "not a list")  # every LPUSH onto it fails (WRONGTYPE)
    guest = running_guest(instance_id, start_guest)
    push(client, instance_id, b"garbage")
    push(client, instance_id, envelope(genuine, instance_id, celery_body(), task="guest.nope",
                                       task_id=f"{instance_id}.guest.unknown"))

    assert ping(instance_id, "after").get(timeout=20)["instance_id"] == instance_id
    wait_until(lambda: nothing_held(client, instance_id), 10, message="queue and unacked keys empty")
    assert guest.log().count(f"could not write the dead-letter entry for guest.{instance_id}") == 2
    assert client.type(deadletter_key(instance_id)) == "string", "left as it was"
    assert guest.alive()


def test_the_dead_letter_list_keeps_the_newest_entries_only() -> None:
    client = redis_client()
    instance_id = unique_id("cap")
    try:
        for n in range(deadletters.MAX_ENTRIES + 5):
            deadletters.push(client, instance_id, {"reason": "invalid", "error": f"e{n}", "id": f"{instance_id}.{n}",
                                                   "body": "never stored", "args": ["secret"]})
        assert client.llen(deadletter_key(instance_id)) == deadletters.MAX_ENTRIES
        newest = deadletters.read(client, instance_id, limit=3)
        assert [e["error"] for e in newest] == [f"e{n}" for n in (1004, 1003, 1002)]
        assert set(newest[0]) == ENTRY_FIELDS, "only the documented fields are stored"
        assert deadletters.read(client, instance_id, limit=0) == []
        assert deadletters.read(client, instance_id, limit=5000)[-1]["error"] == "e5"
    finally:
        client.delete(deadletter_key(instance_id))


# --- Random input: whatever lands on guest.ID is answered or dead-lettered, never kept ----------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
MARKER = "hypothesis-secret-7f3a"


_serial = itertools.count()


def random_items(genuine: Envelope, instance_id: str) -> st.SearchStrategy[tuple[bytes | Envelope, str | None]]:
    """Items for guest.ID, each with the task id it carries (None: it can only be dead-lettered)."""
    bodies = st.one_of(
        st.binary(max_size=32),
        st.builds(lambda value: json.dumps(value).encode(), JSON_VALUES),
        st.builds(lambda kwargs, args: celery_body(args=args, kwargs={**kwargs, "password": MARKER}),
                  st.dictionaries(st.sampled_from(["instance_id", "x"]), st.just(instance_id) | st.text(max_size=5),
                                  max_size=2),
                  st.lists(JSON_VALUES, max_size=2)),
        st.builds(lambda embed: celery_body(kwargs={"instance_id": instance_id}, embed=embed),
                  st.none() | st.dictionaries(st.sampled_from(["callbacks", "chord", "id"]), JSON_VALUES, max_size=2)),
    )

    def build(body: bytes, task: object, content_type: str | None, with_id: bool) -> tuple[Envelope, str | None]:
        task_id = f"{instance_id}.guest.h{next(_serial)}" if with_id else None
        drop = tuple(name for name, gone in (("id", not with_id), ("task", task == "-")) if gone)
        return envelope(genuine, instance_id, body, task=task, task_id=task_id, content_type=content_type,
                        drop=drop), task_id

    envelopes = st.builds(
        build, bodies,
        st.sampled_from(["guest.ping", "guest.ping", "guest.get_status", "guest.nope", "-", None, 5, ["guest.ping"]]),
        st.sampled_from(["application/json", "application/json", "application/x-python-serialize",
                         "application/data", "text/plain", None]),
        st.booleans())
    garbage = st.one_of(st.binary(max_size=48), st.builds(lambda value: json.dumps(value).encode(), JSON_VALUES))
    return st.one_of(envelopes, st.tuples(garbage, st.none()))


def test_random_input_is_answered_or_dead_lettered_and_never_held(
        genuine: Envelope, new_id: Callable[[str], str], start_guest: Callable[[str], Proc]) -> None:
    client = redis_client()
    results = result_client()
    instance_id = new_id("fuzz")
    guest = running_guest(instance_id, start_guest)  # one guest for every example

    @settings(max_examples=15, deadline=None, database=None)
    @given(items=st.lists(random_items(genuine, instance_id), min_size=1, max_size=4))
    def each_item_is_answered_or_dead_lettered(items: list[tuple[bytes | Envelope, str | None]]) -> None:
        client.delete(deadletter_key(instance_id))  # each example reads only its own entries
        for item, _ in items:
            push(client, instance_id, item)
        # The guest serves guest.ID in order: once this is answered, every item above was handled.
        answer = ping(instance_id, f"after{next(_serial)}").get(timeout=20)
        assert answer["instance_id"] == instance_id

        added = deadletters.read(client, instance_id, limit=deadletters.MAX_ENTRIES)
        dead_ids = [entry["id"] for entry in added]
        for _, task_id in items:
            if task_id is not None:
                assert results.exists(result_key(task_id)) or task_id in dead_ids, f"{task_id} left unhandled"
                assert dead_ids.count(task_id) <= 1
        assert dead_ids.count(None) == sum(1 for _, task_id in items if task_id is None), \
            "every item without a task id is dead-lettered, once"
        for entry in added:
            assert set(entry) == ENTRY_FIELDS and MARKER not in json.dumps(entry), entry
        wait_until(lambda: nothing_held(client, instance_id), 10, message="queue and unacked keys empty")

    each_item_is_answered_or_dead_lettered()
    assert guest.alive()
    assert ping(instance_id, "last").get(timeout=20)["instance_id"] == instance_id


def test_the_command_line_stops_quietly_when_its_reader_goes_away() -> None:
    """`python -m workflows list | head -1`: no BrokenPipe traceback. `true` reads nothing and is gone
    before the command line's first line is written, so the pipe is always broken by then."""
    import subprocess
    import sys

    from berth.paths import PROJECT_DIR
    from tests.helpers import project_env

    out = subprocess.run(["bash", "-c", f"{sys.executable} -m workflows list | true; exit ${{PIPESTATUS[0]}}"],
                         capture_output=True, text=True, cwd=PROJECT_DIR, env=project_env(), timeout=60)
    assert out.stderr == "", out.stderr
    assert out.returncode == 1
