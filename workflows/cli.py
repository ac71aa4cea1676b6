"""The command line: ``python -m workflows provision|show|list|delete|ping|dead-letters|guest-env`` and
the guest API: ``status|restart|databases|create-database|delete-database|users|create-user|delete-user``.

Exit codes: 0 done (ACTIVE with --wait), 1 the instance FAILED or the request was refused,
2 bad input, 3 broker unreachable, 4 no taskmanager picked the request up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from berth.brokers import CONNECTION_ERRORS
from berth.config import ensure_safe
from berth.errors import (
    AgentError,
    BerthError,
    GuestError,
    GuestTimeout,
    GuestUnreachable,
    InstanceExists,
    InstanceNotFound,
    InstanceNotServing,
    InvalidField,
    InvalidInput,
    InvalidRequest,
    KeyProblem,
    ProvisioningError,
    QueueMissing,
    SetupError,
)
from berth.guestapi import OPERATIONS
from berth.ids import INSTANCE_ID_FORMAT, fresh_guest_task_id
from berth.keys import check_master_key
from berth.records import FINAL, SERVING, InstanceRecord, Status
from berth.redis_server import redis_cli_command
from berth.spec import check_instance_id
from berth.untrusted import escape
from guest import deadletters
from guest.launch import agent_command
from tasks import channel, guestapi, heartbeats
from tasks.celery_app import app
from tasks.channel import in_seconds
from tasks.runtime import broker, guest_env, raw_redis_client, records, setting
from tasks.taskmanager import validated
from workflows import submit, submit_delete

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BROKER, EXIT_NO_TASKMANAGER = 0, 1, 2, 3, 4
WAIT_MARGIN_S = 60.0
# The broker or the store away (either broker): exit code EXIT_BROKER.
BROKER_DOWN: tuple[type[BaseException], ...] = (OperationalError, redis.RedisError, *CONNECTION_ERRORS)
# Berth's errors (berth/errors.py) as exit codes: the first class in this order that one is.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidRequest, EXIT_USAGE), (InvalidInput, EXIT_USAGE), (SetupError, EXIT_USAGE),
    (ProvisioningError, EXIT_FAILED), (AgentError, EXIT_FAILED), (BerthError, EXIT_FAILED),
    (OperationalError, EXIT_BROKER), (redis.RedisError, EXIT_BROKER),
    *((kind, EXIT_BROKER) for kind in CONNECTION_ERRORS),
)


def exit_code(exc: BaseException) -> int:
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), EXIT_FAILED)


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_user(text: str) -> dict[str, str]:
    name, sep, password = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {name!r} without ':'")
    return {"name": name, "password": password}


def parse_setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key == "prepare_seconds":
        try:
            return key, float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"prepare_seconds={value!r} is not a number of seconds") from None
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows", description="Provision and inspect Berth instances.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provision", help="start provisioning an instance",
                       description=f"Instance ids: {INSTANCE_ID_FORMAT}.")
    p.add_argument("instance_id", metavar="ID")
    p.add_argument("--datastore", default="noop", help="redis or noop (default: noop)")
    p.add_argument("--boot", default="local", help="local (start the guest here), netns (here, in a network namespace "
                   "and as an OS user of its own; needs root) or none (default: local)")
    p.add_argument("--boot-delay", type=float, default=0.0, metavar="S", help="seconds the local guest takes to boot")
    p.add_argument("--ping-deadline", type=float, metavar="S", help="give up on the guest after S seconds")
    p.add_argument("--prepare-deadline", type=float, metavar="S", help="give prepare at most S seconds")
    p.add_argument("--user", action="append", type=parse_user, default=[], metavar="NAME:PASSWORD")
    p.add_argument("--database", action="append", default=[], metavar="NAME")
    p.add_argument("--config", action="append", type=parse_setting, default=[], metavar="KEY=VALUE",
                   help="a datastore setting (redis: maxmemory, maxmemory-policy; noop: prepare_seconds, fail)")
    p.add_argument("--wait", action="store_true", help="follow the provisioning; exit 0 on ACTIVE, 1 on FAILED")
    s = sub.add_parser("show", help="show one instance as JSON")
    s.add_argument("instance_id", metavar="ID")
    ls = sub.add_parser("list", help="list instances")
    ls.add_argument("--json", action="store_true")
    d = sub.add_parser("delete", help="delete an instance (its guest, datastore, queue, results, secrets)")
    d.add_argument("instance_id", metavar="ID")
    d.add_argument("--wait", action="store_true", help="follow the delete; exit 0 once DELETED")
    pg = sub.add_parser("ping", help="ping the instance's guest through its queue")
    pg.add_argument("instance_id", metavar="ID")
    pg.add_argument("--timeout", type=float, default=10.0, metavar="S")
    dl = sub.add_parser("dead-letters", help="messages the instance's guest refused and dropped, newest first")
    dl.add_argument("instance_id", metavar="ID")
    dl.add_argument("--limit", type=int, default=100)
    ge = sub.add_parser("guest-env", help="what a guest started by hand (--boot none) needs: its own broker "
                                          "user and key, as shell variables",
                        description="Prints BERTH_INSTANCE_ID, CELERY_BROKER_URL, CELERY_RESULT_BACKEND and "
                                    "BERTH_GUEST_KEY for the instance's guest (and BERTH_BROKER_CA, the CA its "
                                    "broker's certificate must chain to, when it speaks TLS), then the command "
                                    "that starts it. "
                                    "These are secrets: hand them to that guest only.")
    ge.add_argument("instance_id", metavar="ID")
    ge.add_argument("--json", action="store_true", help="print the variables as one JSON object")
    add_guest_api(sub)
    return parser


# The guest API: command -> (operation, its positional arguments), from berth.guestapi.OPERATIONS.
API_COMMANDS = {op.command: (op.name, tuple(a for a in op.required if a != "password")) for op in OPERATIONS.values()}


def add_guest_api(sub: Any) -> None:
    for command, (name, positional) in API_COMMANDS.items():
        p = sub.add_parser(command, help=f"guest API: {OPERATIONS[name].summary}",
                           description=f"Calls guest.{name} on the instance's guest and prints its answer as JSON. "
                                       "When the guest's last heartbeat is stale it is pinged first.")
        p.add_argument("instance_id", metavar="ID")
        for arg in positional:
            p.add_argument(arg, metavar=arg.upper())
        if name == "create_user":
            p.add_argument("--database", action="append", dest="databases", metavar="DB",
                           help="a database the user may use (repeat; default: all)")
            p.add_argument("--password-stdin", action="store_true",
                           help="read the password from standard input (otherwise it is asked for)")
        p.add_argument("--timeout", type=float, metavar="S", help="wait at most S seconds for the answer")
        p.add_argument("--cast", action="store_true", help="send and return at once with the message id")


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise CliError("the passwords differ", EXIT_USAGE)
    return first


def cmd_guest_api(args: argparse.Namespace) -> int:
    name, positional = API_COMMANDS[args.command]
    arguments = {arg: getattr(args, arg) for arg in positional}
    if name == "create_user":
        arguments["password"] = read_password(args)
        if args.databases is not None:
            arguments["databases"] = args.databases
    check_broker()
    try:
        answer = guestapi.call(args.instance_id, name, arguments, timeout_s=args.timeout, cast=args.cast)
    except InvalidRequest as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    except (InstanceNotFound, InstanceNotServing, GuestUnreachable, GuestTimeout, GuestError, QueueMissing) as exc:
        raise CliError(str(exc), EXIT_FAILED) from exc
    except BROKER_DOWN as exc:
        raise CliError(f"broker unreachable at {broker_name()}: {why(exc)}", EXIT_BROKER) from exc
    print(json.dumps(answer, indent=2, sort_keys=True))
    return EXIT_OK


def why(exc: BaseException) -> str:
    """An error's type and text, and what caused it when it says nothing itself (kombu's
    OperationalError, say, or a nacked publish)."""
    text = str(exc).strip()
    if text:
        return f"{type(exc).__name__}: {text}"
    cause = exc.__cause__ or exc.__context__
    return type(exc).__name__ + (f" ({why(cause)})" if cause is not None else "")


def broker_name() -> str:
    """The broker URL without its password: every URL of a cluster's failover list (kombu masks
    only the first)."""
    return ";".join(str(maybe_sanitize_url(url)) for url in str(app.conf.broker_url).split(";"))


def check_broker() -> None:
    try:
        records().client.ping()
    except redis.RedisError as exc:
        raise CliError(f"broker unreachable at {broker_name()}: {exc}. Start Berth with `make run` "
                       "or point CELERY_BROKER_URL at a running Redis.", EXIT_BROKER) from exc
    try:
        check_master_key(records().client)
    except KeyProblem as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def request_from(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"datastore": args.datastore, "boot": args.boot, "boot_delay_s": args.boot_delay,
                               "users": args.user, "databases": args.database, "config": dict(args.config)}
    if args.ping_deadline is not None:
        request["ping_deadline_s"] = args.ping_deadline
    if args.prepare_deadline is not None:
        request["prepare_deadline_s"] = args.prepare_deadline
    return request


def cmd_provision(args: argparse.Namespace) -> int:
    request = request_from(args)
    try:
        spec = validated(args.instance_id, **request)
    except InvalidRequest as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    check_broker()
    try:
        request_id = submit(spec.instance_id, **request)
    except InstanceExists as exc:
        raise CliError(str(exc), EXIT_FAILED) from exc
    except BROKER_DOWN as exc:
        raise CliError(f"broker unreachable at {broker_name()}: {why(exc)}", EXIT_BROKER) from exc
    sent = app.AsyncResult(request_id)
    print(f"provisioning {spec.instance_id} (request {request_id})", flush=True)
    if not args.wait:
        print(f"follow it with: python -m workflows show {spec.instance_id}")
        return EXIT_OK
    timeout_s = spec.boot_delay_s + spec.ping_deadline_s + spec.prepare_deadline_s + WAIT_MARGIN_S
    return follow(spec.instance_id, sent, timeout_s)


def progress_lines(record: InstanceRecord, now: float | None = None) -> list[str]:
    """One line per step the record shows done so far, in order, each with its time since the request.

    While the guest has not answered, the last line says which ping is out and how long is left.
    """
    now = time.time() if now is None else now
    created = float(record["created_at"])

    def at(field: str) -> str:
        return f"(+{float(record[field]) - created:.2f} s)"

    lines = []
    if record.get("queue_created_at"):
        lines.append(f"queue guest.{record.instance_id} created {at('queue_created_at')}")
    if record.get("booted_at"):
        lines.append(f"guest booted (driver {record['boot']}) {at('booted_at')}")
    attempts = record.get("ping_attempts", 0)
    if record.get("guest_ready_at"):
        lines.append(f"guest answered ping {max(1, attempts)} (agent {record.get('guest_version')}) "
                     f"{at('guest_ready_at')}")
    elif attempts and record.status is Status.BUILD and record.get("ping_deadline_at"):
        left = max(0.0, float(record["ping_deadline_at"]) - now)
        nobody = ", nobody consumes its queue yet" if record.get("guest_consumers") == 0 else ""
        lines.append(f"waiting for guest: ping {attempts} sent, {left:.1f} s left{nobody}")
    if record.get("prepare_sent_at"):
        lines.append(f"prepare sent {at('prepare_sent_at')}")
    if record.status is Status.ACTIVE or record.get("active_at"):
        lines.append(f"ACTIVE {at('active_at')}" if record.get("active_at") else "ACTIVE")
    elif record.status is Status.FAILED:
        lines.append(f"FAILED {record.reason}: {record.get('error')}")
    return lines


class Progress:
    """Prints progress lines as they come: a finished step once; the waiting line, on a terminal,
    rewritten in place as the pings go out and the time runs down (elsewhere, once per ping)."""

    def __init__(self, instance_id: str, out: Any = None) -> None:
        self.instance_id, self.out = instance_id, out or sys.stdout
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self.done: list[str] = []
        self.pending = ""

    def show(self, lines: list[str]) -> None:
        waiting = lines[-1] if lines and lines[-1].startswith("waiting for guest") else ""
        finished = lines[:-1] if waiting else lines
        for line in finished[len(self.done):]:
            self._print(line)
        self.done = list(finished) if len(finished) > len(self.done) else self.done
        if waiting and (self.live or _ping_of(waiting) != _ping_of(self.pending)):
            if self.live:
                self.out.write(f"\r\033[K{self.instance_id}: {escape(waiting)}")
                self.out.flush()
            else:
                print(f"{self.instance_id}: {escape(waiting)}", file=self.out, flush=True)
        self.pending = waiting

    def _print(self, line: str) -> None:
        if self.live and self.pending:
            self.out.write("\n")  # the wait's last state stays on screen
        # Lines quote what a guest answered: never a control character of its on the terminal.
        print(f"{self.instance_id}: {escape(line)}", file=self.out, flush=True)
        self.pending = ""


def _ping_of(line: str) -> str:
    return line.partition(" sent")[0]


def follow(instance_id: str, sent: Any, timeout_s: float) -> int:
    started = time.monotonic()
    progress = Progress(instance_id)
    while time.monotonic() - started < timeout_s:
        record = records().get(instance_id)
        if record is None or record.status is Status.NEW:
            if sent.state == "FAILURE":
                raise CliError(f"request refused: {sent.result}", EXIT_FAILED)
            if time.monotonic() - started > setting("pickup_timeout_s"):
                raise CliError(f"no taskmanager picked the request up within {setting('pickup_timeout_s'):g} s: "
                               "is `celery -A tasks worker -Q taskmanager` running? The request is kept and "
                               "starts when one runs.", EXIT_NO_TASKMANAGER)
        if record is not None:
            progress.show(progress_lines(record))
            if record.status in FINAL:
                return EXIT_OK if record.status in SERVING else EXIT_FAILED
        time.sleep(0.1)
    raise CliError(f"{instance_id} still not ACTIVE or FAILED after {timeout_s:g} s", EXIT_FAILED)


def _iso(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC).isoformat(timespec="milliseconds")


def describe(record: InstanceRecord) -> dict[str, Any]:
    """The record as JSON-ready data: timestamps in ISO 8601 UTC, and how to connect."""
    data: dict[str, Any] = {}
    for name, value in sorted(record.fields.items()):
        data[name] = _iso(value) if name.endswith("_at") and isinstance(value, float) else value
    data["connect"] = connect_hint(record)
    if record.status is not Status.DELETED:
        # Consumers of guest.ID, live, where the broker tells (RabbitMQ; not Redis).
        consumers = broker().consumers(record.instance_id)
        if consumers is not None:
            data["guest_consumers"] = consumers
    if record.status in SERVING:
        age = heartbeats.age_s(record)
        data["last_heartbeat_age_s"] = None if age is None else round(age, 1)
    return data


def _redis_connection(connection: Any) -> bool:
    """Whether prepare's answer names a Redis to connect to (a guest's answer: its types are checked)."""
    return isinstance(connection, dict) and connection.get("datastore") == "redis" \
        and isinstance(connection.get("host"), str) and isinstance(connection.get("port"), int)


def connect_hint(record: InstanceRecord) -> dict[str, Any] | None:
    connection = record.get("connection") or {}
    if record.status is not Status.ACTIVE or not _redis_connection(connection):
        return None
    user = (connection.get("users") or ["USER"])[0]
    prefix = (connection.get("key_prefixes") or ["DB:"])[0]
    return {
        "host": connection["host"], "port": connection["port"], "users": connection.get("users", []),
        "key_prefixes": connection.get("key_prefixes", []),
        "redis_cli": f"{redis_cli_command()} -h {connection['host']} -p {connection['port']} --user {user} "
                     f"--pass YOUR_PASSWORD SET {prefix}hello world",
        "url": f"redis://{user}:YOUR_PASSWORD@{connection['host']}:{connection['port']}/0",
    }


def cmd_show(args: argparse.Namespace) -> int:
    check_broker()
    record = records().get(args.instance_id)
    if record is None:
        raise CliError(f"no instance {args.instance_id!r}", EXIT_FAILED)
    connected = None
    if record.status is not Status.DELETED:
        # The guest's address and transport, live from the broker (and kept on the record).
        connected = channel.note_guest_address(record.instance_id) is not None
        record = records().get(record.instance_id) or record
    print(json.dumps({**describe(record), "guest_connected": connected}, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    check_broker()
    rows = records().all()
    if args.json:
        print(json.dumps([describe(r) for r in rows], indent=2, sort_keys=True))
        return EXIT_OK
    # The guest's address and transport as recorded when it last answered a ping (or by `show`).
    print(f"{'ID':<24} {'STATUS':<8} {'REASON':<18} {'DATASTORE':<9} {'GUEST HOST':<15} {'TRANSPORT':<9} CREATED")
    for r in rows:
        print(f"{r.instance_id:<24} {r.status.value:<8} {escape(r.reason or '-'):<18} {escape(r['datastore']):<9} "
              f"{r.get('guest_host') or '-':<15} {r.get('guest_transport') or '-':<9} {_iso(r['created_at'])}")
    return EXIT_OK


def _checked_id(instance_id: str) -> str:
    try:
        return check_instance_id(instance_id)
    except InvalidField as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def _existing(text: str) -> InstanceRecord:
    """The record of the instance named on the command line: exit 2 for a bad id, 1 for none."""
    instance_id = _checked_id(text)
    check_broker()
    record = records().get(instance_id)
    if record is None:
        raise CliError(f"no instance {instance_id!r}", EXIT_FAILED)
    return record


def cmd_delete(args: argparse.Namespace) -> int:
    record = _existing(args.instance_id)
    instance_id = record.instance_id
    if record.status is Status.DELETED:
        print(f"{instance_id} is already deleted")
        return EXIT_OK
    try:
        request_id = submit_delete(instance_id)
    except BROKER_DOWN as exc:
        raise CliError(f"broker unreachable at {broker_name()}: {why(exc)}", EXIT_BROKER) from exc
    except InstanceNotFound as exc:
        raise CliError(str(exc), EXIT_FAILED) from exc
    sent = AsyncResult(request_id, app=app)
    print(f"deleting {instance_id} (request {request_id})", flush=True)
    if not args.wait:
        print(f"follow it with: python -m workflows show {instance_id}")
        return EXIT_OK
    timeout_s = sum(setting(n) for n in ("delete_ping_deadline_s", "shutdown_deadline_s", "chain_stop_wait_s"))
    return follow_delete(instance_id, sent, timeout_s + WAIT_MARGIN_S)


def delete_lines(record: InstanceRecord) -> list[str]:
    lines = []
    if record.status in (Status.DELETING, Status.DELETED):
        lines.append(f"DELETING (was {record.get('deleted_from')}): chain stopped, guest asked to shut down")
    if record.get("guest_shutdown"):
        outcome = record["guest_shutdown"]
        lines.append("guest shut its datastore down" if outcome == "done" else f"guest: {outcome}; stopping it anyway")
    if record.status is Status.DELETED:
        lines.append(f"DELETED ({record.get('keys_removed', 0)} broker keys removed; record kept for audit)")
    return lines


def follow_delete(instance_id: str, sent: Any, timeout_s: float) -> int:
    started, printed = time.monotonic(), 0
    while time.monotonic() - started < timeout_s:
        record = records().get(instance_id)
        if record is None:
            print(f"{instance_id}: DELETED (audit record expired)")
            return EXIT_OK
        if record.status not in (Status.DELETING, Status.DELETED):
            if sent.state == "FAILURE":
                raise CliError(f"delete refused: {sent.result}", EXIT_FAILED)
            if time.monotonic() - started > setting("pickup_timeout_s"):
                raise CliError(f"no taskmanager picked the delete up within {setting('pickup_timeout_s'):g} s: "
                               "is `celery -A tasks worker -Q taskmanager` running?", EXIT_NO_TASKMANAGER)
        lines = delete_lines(record)
        for line in lines[printed:]:
            print(f"{instance_id}: {escape(line)}", flush=True)
        printed = max(printed, len(lines))
        if record.status is Status.DELETED:
            return EXIT_OK
        time.sleep(0.1)
    raise CliError(f"{instance_id} still not DELETED after {timeout_s:g} s", EXIT_FAILED)


def cmd_ping(args: argparse.Namespace) -> int:
    record = _existing(args.instance_id)
    instance_id = record.instance_id
    started = time.monotonic()
    ping_id = fresh_guest_task_id(instance_id, "cliping")
    try:
        pong = channel.ping(record, ping_id, expires=in_seconds(args.timeout), wait_s=args.timeout)
    except QueueMissing as exc:
        raise CliError(str(exc), EXIT_FAILED) from exc
    except BROKER_DOWN as exc:
        raise CliError(f"could not send the ping to guest.{instance_id}: {exc}", EXIT_FAILED) from exc
    if pong is None:
        raise CliError(f"guest of {instance_id} did not answer with a pong within {args.timeout:g} s", EXIT_FAILED)
    print(json.dumps({**pong, "round_trip_ms": round((time.monotonic() - started) * 1000, 1)}))
    return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace) -> int:
    instance_id = _checked_id(args.instance_id)
    check_broker()
    print(json.dumps(deadletters.read(raw_redis_client(), instance_id, limit=args.limit), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_guest_env(args: argparse.Namespace) -> int:
    record = _existing(args.instance_id)
    instance_id = record.instance_id
    if record.status in (Status.DELETING, Status.DELETED):
        raise CliError(f"instance {instance_id} is {record.status.value}: its guest's credentials are revoked",
                       EXIT_FAILED)
    env = guest_env(instance_id, record["request_id"])
    if args.json:
        print(json.dumps(env, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"# The guest of {instance_id}: its own broker user and key. Secrets: for that guest only.")
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    print(f"# then: {' '.join(agent_command(instance_id)[1:]).replace('-m celery', 'celery', 1)}")
    return EXIT_OK


COMMANDS = {"provision": cmd_provision, "show": cmd_show, "list": cmd_list, "delete": cmd_delete,
            "ping": cmd_ping, "dead-letters": cmd_dead_letters, "guest-env": cmd_guest_env,
            **dict.fromkeys(API_COMMANDS, cmd_guest_api)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ensure_safe(app.conf)
        return COMMANDS[args.command](args)
    except (CliError, BerthError) + BROKER_DOWN as exc:
        print("error: " + "\n".join(escape(line) for line in str(exc).split("\n")), file=sys.stderr)
        return exc.code if isinstance(exc, CliError) else exit_code(exc)
