"""The command line: ``python -m workflows provision|show|list``.

Exit codes: 0 done (ACTIVE with --wait), 1 the instance FAILED or the request was refused,
2 bad input, 3 broker unreachable, 4 no taskmanager picked the request up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from berth.broker import redis_cli_command
from berth.config import UnsafeSettings, ensure_safe
from berth.ids import INSTANCE_ID_FORMAT
from tasks import app
from tasks.errors import InvalidRequest
from tasks.records import FINAL, InstanceRecord, Status
from tasks.runtime import records, setting
from tasks.taskmanager import validated

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BROKER, EXIT_NO_TASKMANAGER = 0, 1, 2, 3, 4
WAIT_MARGIN_S = 60.0


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_user(text: str) -> dict[str, str]:
    name, sep, password = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {name!r} without ':'")
    return {"name": name, "password": password}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows", description="Provision and inspect Berth instances.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provision", help="start provisioning an instance",
                       description=f"Instance ids: {INSTANCE_ID_FORMAT}.")
    p.add_argument("instance_id", metavar="ID")
    p.add_argument("--datastore", default="noop", help="redis or noop (default: noop)")
    p.add_argument("--boot", default="local", help="local (start the guest here) or none (default: local)")
    p.add_argument("--boot-delay", type=float, default=0.0, metavar="S", help="seconds the local guest takes to boot")
    p.add_argument("--ping-deadline", type=float, metavar="S", help="give up on the guest after S seconds")
    p.add_argument("--prepare-deadline", type=float, metavar="S", help="give prepare at most S seconds")
    p.add_argument("--user", action="append", type=parse_user, default=[], metavar="NAME:PASSWORD")
    p.add_argument("--database", action="append", default=[], metavar="NAME")
    p.add_argument("--wait", action="store_true", help="follow the provisioning; exit 0 on ACTIVE, 1 on FAILED")
    s = sub.add_parser("show", help="show one instance as JSON")
    s.add_argument("instance_id", metavar="ID")
    ls = sub.add_parser("list", help="list instances")
    ls.add_argument("--json", action="store_true")
    return parser


def broker_name() -> str:
    return str(maybe_sanitize_url(app.conf.broker_url))


def check_broker() -> None:
    try:
        records().client.ping()
    except redis.RedisError as exc:
        raise CliError(f"broker unreachable at {broker_name()}: {exc}. Start Berth with `make run` "
                       "or point CELERY_BROKER_URL at a running Redis.", EXIT_BROKER) from exc


def request_from(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"datastore": args.datastore, "boot": args.boot, "boot_delay_s": args.boot_delay,
                               "users": args.user, "databases": args.database}
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
    existing = records().get(spec.instance_id)
    if existing is not None and existing.status is not Status.DELETED:
        raise CliError(f"instance {spec.instance_id} already exists (status {existing.status.value})", EXIT_FAILED)
    try:
        sent = app.send_task("workflows.provision", args=[spec.instance_id], kwargs=request)
    except OperationalError as exc:
        raise CliError(f"broker unreachable at {broker_name()}: {exc}", EXIT_BROKER) from exc
    print(f"provisioning {spec.instance_id} (request {sent.id})", flush=True)
    if not args.wait:
        print(f"follow it with: python -m workflows show {spec.instance_id}")
        return EXIT_OK
    timeout_s = spec.boot_delay_s + spec.ping_deadline_s + spec.prepare_deadline_s + WAIT_MARGIN_S
    return follow(spec.instance_id, sent, timeout_s)


def progress_lines(record: InstanceRecord) -> list[str]:
    """Human lines for what the record shows so far, in order (printed once each)."""
    lines = []
    if record.get("queue_created_at"):
        lines.append(f"queue guest.{record.instance_id} created")
    if record.get("booted_at"):
        lines.append(f"guest booted (driver {record['boot']})")
    attempts = record.get("ping_attempts", 0)
    for n in range(1, attempts + 1):
        lines.append(f"ping {n} sent, waiting for guest")
    if record.get("guest_ready_at"):
        lines.append(f"guest answered (agent {record.get('guest_version')})")
    if record.get("prepare_sent_at"):
        lines.append("prepare sent")
    if record.status is Status.ACTIVE:
        lines.append("ACTIVE")
    elif record.status is Status.FAILED:
        lines.append(f"FAILED {record.reason}: {record.get('error')}")
    return lines


def follow(instance_id: str, sent: Any, timeout_s: float) -> int:
    started = time.monotonic()
    printed = 0
    while time.monotonic() - started < timeout_s:
        record = records().get(instance_id)
        if record is None:
            if sent.state == "FAILURE":
                raise CliError(f"request refused: {sent.result}", EXIT_FAILED)
            if time.monotonic() - started > setting("pickup_timeout_s"):
                raise CliError(f"no taskmanager picked the request up within {setting('pickup_timeout_s'):g} s: "
                               "is `celery -A tasks worker -Q taskmanager` running?", EXIT_NO_TASKMANAGER)
        else:
            lines = progress_lines(record)
            for line in lines[printed:]:
                print(f"{instance_id}: {line}", flush=True)
            printed = max(printed, len(lines))
            if record.status in FINAL:
                return EXIT_OK if record.status is Status.ACTIVE else EXIT_FAILED
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
    return data


def connect_hint(record: InstanceRecord) -> dict[str, Any] | None:
    connection = record.get("connection") or {}
    if record.status is not Status.ACTIVE or connection.get("datastore") != "redis":
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
    print(json.dumps(describe(record), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    check_broker()
    rows = records().all()
    if args.json:
        print(json.dumps([describe(r) for r in rows], indent=2, sort_keys=True))
        return EXIT_OK
    print(f"{'ID':<24} {'STATUS':<8} {'REASON':<18} {'DATASTORE':<9} CREATED")
    for r in rows:
        print(f"{r.instance_id:<24} {r.status.value:<8} {r.reason or '-':<18} {r['datastore']:<9} "
              f"{_iso(r['created_at'])}")
    return EXIT_OK


COMMANDS = {"provision": cmd_provision, "show": cmd_show, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ensure_safe(app.conf)
    except UnsafeSettings as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
