"""Idle guests: what N connected guests with nothing to do cost the broker.

    .venv/bin/python -m bench.idle --broker redis|rabbitmq --guests 1000,10000 [--window 30] [--pings 30]

Each N runs in a process of its own on a fresh private stack (bench/common.py: its own broker,
a taskmanager with 2 worker processes) and one real guest agent, provisioned (``noop``) so that
it heartbeats. Then, in this order:

1. baseline: the broker's CPU over ``--window`` seconds, its RSS, and ``--pings`` pings of the
   real guest (send -> answer), with no other guest;
2. N guests declared and minted as create_queue does (queue, broker user, key), then N fake
   idle guests connected (bench/idlefakes.py: exactly the connections and idle traffic of a
   real agent, from the guest app's own settings), heartbeats off: CPU over the window
   ("polling");
3. heartbeats on (each fake writes the real reporter's signed report every
   ``berth_heartbeat_interval_s``): CPU over the window again ("heartbeats"); the difference is
   the heartbeat path's cost on the store (on Redis the broker itself; beside RabbitMQ the Redis
   store);
4. pings of the real guest while the N fakes idle, then the broker's RSS.

CPU is utime + stime of the broker's processes (/proc/PID/stat; RabbitMQ: the node's whole
process tree, beam.smp included) over the window, as a share of one core, minus nothing: the
baseline is reported beside it. Memory per idle guest is (RSS after - RSS at baseline) / N.
Redis also reports the calls of each command in each window (INFO commandstats).

The first N of a run also calibrates the fakes against the real agent (``--calibrate``): one
fake beside the real guest for a window, the commands each sent counted by broker user
(MONITOR on the Redis holding its keys) and, on RabbitMQ, each one's AMQP connection as the
management API describes it.

A broker holds one file descriptor per connection: N is capped at the ceiling the hard
RLIMIT_NOFILE allows (``ceiling``), and the result says so.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BenchStack, broker_option, machine, summary_ms
from bench.idlefakes import (
    REDIS_CONNECTIONS,
    STORE_CONNECTIONS_BESIDE_RABBITMQ,
    AgentSettings,
    GuestSpec,
    Switches,
    serve_process,
)

PROJECT = Path(__file__).resolve().parent.parent
REAL = "idle-real"
# Fakes per process: each client connection is a file descriptor of that process too.
GUESTS_PER_PROCESS = 2000
# Descriptors kept for everything else on the broker (taskmanager, real guest, this process, files).
RESERVED_FDS = 200
TICKS = os.sysconf("SC_CLK_TCK")


# --- The broker's processes ---------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """pid and every descendant of it."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += children.get(current, [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_mib(pids: list[int]) -> float:
    from bench.common import rss_kib

    return sum(rss_kib(pid) for pid in pids) / 1024


class Probe:
    """The broker's (and the store's, beside RabbitMQ) processes, CPU and memory."""

    def __init__(self, stack: BenchStack) -> None:
        brokers = stack.brokers
        assert brokers.store.process is not None, "the store is started"
        store = brokers.store.process.pid
        self.pids = {"broker": process_tree(int(brokers.nodes[0].pid())) if brokers.nodes else [store]}
        if brokers.nodes:
            self.pids["store"] = [store]

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pids) for name, pids in self.pids.items()}

    def rss(self) -> dict[str, float]:
        return {name: round(rss_mib(pids), 1) for name, pids in self.pids.items()}


def redis_calls(client: Any) -> dict[str, tuple[int, int]]:
    """INFO commandstats: calls and microseconds per command."""
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in client.info("commandstats").items()}


def window(probe: Probe, store: Any, seconds: float) -> dict[str, Any]:
    """The broker's (and store's) share of one core over ``seconds``, and the store's commands per second."""
    cpu0, calls0, t0 = probe.cpu(), redis_calls(store), time.monotonic()
    time.sleep(seconds)
    cpu1, calls1, t1 = probe.cpu(), redis_calls(store), time.monotonic()
    elapsed = t1 - t0
    calls = {name: (calls1[name][0] - calls0.get(name, (0, 0))[0], calls1[name][1] - calls0.get(name, (0, 0))[1])
             for name in calls1}
    return {"seconds": round(elapsed, 1),
            "cpu_pct_of_one_core": {name: round(100 * (cpu1[name] - cpu0[name]) / elapsed, 2) for name in cpu1},
            "store_calls_per_s": {name: round(n / elapsed, 1) for name, (n, _) in sorted(calls.items()) if n},
            "store_command_cpu_pct": round(sum(us for _, us in calls.values()) / elapsed / 1e4, 2)}


# --- Guests -------------------------------------------------------------------------------------

def ceiling(on_rabbitmq: bool) -> int:
    """The most guests one broker process can hold here: one descriptor per connection, at most
    the hard RLIMIT_NOFILE (the broker inherits it; raising it needs CAP_SYS_RESOURCE)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_guest = STORE_CONNECTIONS_BESIDE_RABBITMQ if on_rabbitmq else REDIS_CONNECTIONS
    return (hard - RESERVED_FDS) // per_guest


def settling_s(on_rabbitmq: bool) -> float:
    """How long after the guests connect their cost is that of idle guests."""
    if not on_rabbitmq:
        return 2.0
    from devtools.rabbitmq import STATS_INTERVAL_S

    return STATS_INTERVAL_S + 2.0


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def negotiated_amqp_heartbeat(broker_url: str, proposed: int) -> int:
    """What py-amqp and the node agree on for a client proposing ``proposed`` (as a Celery worker does)."""
    from kombu.connection import Connection

    with Connection(broker_url, heartbeat=proposed) as conn:
        conn.connect()
        return int(conn.connection.heartbeat or 0)


def mint(instance_ids: list[str]) -> list[GuestSpec]:
    """Declare and mint each guest as create_queue does; its `guest-env`."""
    from tasks.runtime import broker, guest_env

    def one(instance_id: str) -> GuestSpec:
        request_id = uuid.uuid4().hex
        broker().declare_guest_queue(instance_id)
        broker().mint_guest(instance_id, request_id)
        env = guest_env(instance_id, request_id)
        return GuestSpec(instance_id, env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"], env["BERTH_GUEST_KEY"])

    if not instance_ids:
        return []
    first = one(instance_ids[0])  # makes the master key, if this is its first use, before any thread reads it
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return [first, *pool.map(one, instance_ids[1:])]


class Fakes:
    """Fake idle guests in child processes (bench/idlefakes.py)."""

    def __init__(self, specs: list[GuestSpec], settings: AgentSettings) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.switches = Switches(ctx.Event(), ctx.Event())
        self.ready = ctx.Queue()
        self.count = len(specs)
        self.procs = [ctx.Process(target=serve_process, daemon=True,
                                  args=(specs[i:i + GUESTS_PER_PROCESS], settings, self.switches, self.ready))
                      for i in range(0, len(specs), GUESTS_PER_PROCESS)]
        for proc in self.procs:
            proc.start()

    def wait_connected(self, timeout_s: float) -> None:
        connected, deadline = 0, time.monotonic() + timeout_s
        while connected < self.count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{connected} of {self.count} fake guests connected in {timeout_s:g} s")
            try:
                got = self.ready.get(timeout=min(left, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty: look at the deadline again
                continue
            if got != 1:
                raise RuntimeError(f"a fake guest could not connect: {got}")
            connected += 1

    def heartbeats(self, on: bool) -> None:
        (self.switches.heartbeats.set if on else self.switches.heartbeats.clear)()

    def close(self, timeout_s: float) -> None:
        self.switches.stop.set()
        for proc in self.procs:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def provision_real_guest(stack: BenchStack) -> tuple[str, Any]:
    """The real guest agent, ACTIVE (it heartbeats); its request id and process."""
    from bench.latency import start_guests
    from workflows import provision_chain

    guests, request_ids = start_guests(stack, [REAL])
    provision_chain(REAL, request_id=request_ids[REAL], datastore="noop", boot="none").apply_async().get(timeout=60)
    return request_ids[REAL], guests[0]


def pings(request_id: str, count: int) -> dict[str, float]:
    """Ping the real guest through its queue ``count`` times, one at a time: send -> answer."""
    import datetime as dt

    from berth.ids import guest_task_prefix
    from berth.keys import guest_key
    from tasks import channel

    key, times = guest_key(REAL, request_id), []
    for _ in range(count):
        started = time.perf_counter()
        channel.publish(REAL, "guest.ping", kwargs={"instance_id": REAL},
                        task_id=f"{guest_task_prefix(REAL)}idle.{uuid.uuid4().hex[:12]}",
                        expires=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10), key=key).get(timeout=10)
        times.append(time.perf_counter() - started)
    return summary_ms(times)


# --- Checking the fakes against the real agent ----------------------------------------------------

def commands_by_user(store: Any, seconds: float, users: set[str]) -> dict[str, dict[str, int]]:
    """Each user's commands on this Redis over ``seconds`` (MONITOR), by command name."""
    owner = {c["addr"]: c.get("user") for c in store.client_list()}
    counts: dict[str, dict[str, int]] = {user: collections.Counter() for user in users}
    end = time.monotonic() + seconds
    with store.monitor() as monitor:
        for command in monitor.listen():
            if time.monotonic() > end:
                break
            addr = f"{command.get('client_address')}:{command.get('client_port')}"
            if addr not in owner:  # a connection opened since (a reporter connects on its first report)
                owner = {c["addr"]: c.get("user") for c in store.client_list()}
            user = owner.get(addr)
            if user in counts:
                counts[user][command["command"].split(" ", 1)[0].upper()] += 1
    return {user: dict(sorted(c.items())) for user, c in counts.items()}


def connections(store: Any, users: set[str], admin: Any = None) -> dict[str, Any]:
    """What the broker sees of each user: its Redis connections; with RabbitMQ's management API
    (``admin``), its AMQP connection and channel too."""
    seen: dict[str, Any] = {user: {"redis_connections": 0} for user in users}
    for client in store.client_list():
        if client.get("user") in seen:
            seen[client["user"]]["redis_connections"] += 1
    if admin is not None:
        amqp = amqp_connections(admin, users)
        for user in users:
            seen[user].update(amqp.get(user, {}))
    return seen


def amqp_connections(admin: Any, users: set[str]) -> dict[str, dict[str, Any]]:
    """Each user's AMQP connection and channel as the management database describes them, once it
    has collected a channel's figures for every user: a node emits and collects them every
    ``STATS_INTERVAL_S`` (devtools/rabbitmq.py), so that takes up to two intervals."""
    from devtools.rabbitmq import STATS_INTERVAL_S

    deadline = time.monotonic() + 2 * STATS_INTERVAL_S + 15
    while True:
        seen: dict[str, dict[str, Any]] = collections.defaultdict(dict)
        for conn in admin.call("GET", "/api/connections"):
            if conn.get("user") in users:
                seen[conn["user"]].update(amqp_heartbeat_s=conn.get("timeout"), channels=conn.get("channels"))
        for channel in admin.call("GET", "/api/channels"):
            if channel.get("user") in users:
                seen[channel["user"]].update(global_prefetch=channel.get("global_prefetch_count"),
                                            consumers=channel.get("consumer_count"))
        complete = all(seen[user].get("consumers") is not None and seen[user].get("channels") for user in users)
        if complete or time.monotonic() > deadline:
            return dict(seen)
        time.sleep(1)


def calibrate(stack: BenchStack, store: Any, settings: AgentSettings, seconds: float) -> dict[str, Any]:
    """One fake beside the real guest: the same connections, and the same commands in the same window?"""
    from berth.brokers.redis.acl import user_name

    fake = "idle-calibration"
    fakes = Fakes(mint([fake]), settings)
    try:
        fakes.wait_connected(60)
        fakes.heartbeats(True)
        users = {user_name(REAL), user_name(fake)}
        counts = commands_by_user(store, seconds, users)
        seen = connections(store, users, stack.brokers.admin() if stack.on_rabbitmq else None)
    finally:
        fakes.close(settings.brpop_timeout_s + 5)
    real, played = ({"connections": seen[user_name(who)], "commands": counts[user_name(who)]} for who in (REAL, fake))
    return {"window_s": seconds, "real_agent": real, "fake": played,
            "match": real["connections"] == played["connections"] and same_counts(real["commands"], played["commands"])}


def same_counts(real: dict[str, int], fake: dict[str, int]) -> bool:
    """The same commands, each as often within one (the two report and poll at other moments) or 10 %."""
    return set(real) == set(fake) and all(abs(real[c] - fake[c]) <= max(1, 0.1 * real[c]) for c in real)


# --- One N ------------------------------------------------------------------------------------------

def run(broker: str, guests: int, window_s: float, ping_count: int, calibrate_s: float) -> dict[str, Any]:
    raise_fd_limit()
    stack = BenchStack(broker)
    try:
        from guest import heartbeat
        from tasks.runtime import redis_client

        store = redis_client()  # the Redis with the heartbeats: the broker, or the store beside RabbitMQ
        store.config_set("maxclients", resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 32)
        stack.start_taskmanager()
        settings = AgentSettings.of_guest_app()
        if stack.on_rabbitmq:
            settings = dataclasses.replace(settings, amqp_heartbeat_s=negotiated_amqp_heartbeat(
                stack.brokers.url, settings.amqp_heartbeat_s))
        request_id, _real = provision_real_guest(stack)
        probe = Probe(stack)
        result: dict[str, Any] = {"broker": broker, "guests_asked": guests, "date": machine()["date"],
                                  "settings": dataclasses.asdict(settings)}
        if calibrate_s:
            # The agent's reporter connects for its first report: idle means after that.
            time.sleep(heartbeat.SOON_S + 1)
            result["calibration"] = calibrate(stack, store, settings, calibrate_s)
        result["baseline"] = {"rss_mib": probe.rss(), "ping": pings(request_id, ping_count),
                              "idle": window(probe, store, window_s)}
        n = min(guests, ceiling(stack.on_rabbitmq))
        result.update(guests=n, ceiling=ceiling(stack.on_rabbitmq),
                      fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        started = time.monotonic()
        specs = mint([f"idle-{i}" for i in range(n)])
        result["declare_and_mint_s"] = round(time.monotonic() - started, 1)
        fakes = Fakes(specs, settings)
        try:
            started = time.monotonic()
            fakes.wait_connected(600)
            result["connect_s"] = round(time.monotonic() - started, 1)
            # RabbitMQ's management database takes in every new connection, channel, consumer and
            # queue at its next collection, once: idle means after it.
            time.sleep(settling_s(stack.on_rabbitmq))
            result["polling"] = window(probe, store, window_s)
            fakes.heartbeats(True)
            time.sleep(settings.heartbeat_interval_s)  # every fake has begun its reports
            result["heartbeats"] = window(probe, store, window_s)
            result["ping_while_idle"] = pings(request_id, ping_count)
            result["rss_mib"] = probe.rss()
            result["connections_seen"] = connections(store, {"guest.idle-0", f"guest.idle-{n - 1}"},
                                                     stack.brokers.admin() if stack.on_rabbitmq else None)
        finally:
            fakes.close(settings.brpop_timeout_s + 10)
        return summarize(result)
    finally:
        stack.close()


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The figures BENCHMARKS.md shows, from the raw ones."""
    n, base = result["guests"], result["baseline"]
    cpu = {phase: result[phase]["cpu_pct_of_one_core"] for phase in ("polling", "heartbeats")}
    result["summary"] = {
        "broker_cpu_pct_of_one_core": cpu["heartbeats"]["broker"],
        "broker_cpu_pct_baseline": base["idle"]["cpu_pct_of_one_core"]["broker"],
        "heartbeat_path_cpu_pct": round(cpu["heartbeats"].get("store", cpu["heartbeats"]["broker"])
                                        - cpu["polling"].get("store", cpu["polling"]["broker"]), 2),
        "mib_per_guest": {name: round((mib - base["rss_mib"][name]) / n, 4) for name, mib in result["rss_mib"].items()},
        "ping_p50_ms": {"idle_broker": round(base["ping"]["p50_ms"], 2),
                        "with_guests": round(result["ping_while_idle"]["p50_ms"], 2)},
    }
    # Held fewer than asked (the ceiling): the guests' share scaled to the number asked, linearly.
    idle_broker = base["idle"]["cpu_pct_of_one_core"]["broker"]
    scaled = idle_broker + (cpu["heartbeats"]["broker"] - idle_broker) * result["guests_asked"] / n
    result["summary"].update(broker_cpu_pct_for_guests_asked=round(scaled, 2), goal_10pct_met=scaled < 10.0,
                             traffic_delivered_pct=delivered(result))
    if "store" in cpu["heartbeats"]:
        result["summary"]["store_cpu_pct_of_one_core"] = cpu["heartbeats"]["store"]
    return result


# --- BENCHMARKS.md: one block per broker, kept by `make bench` (bench/run.py) ---------------------------

IDLE_HEADING = "## Idle guests (`make bench-idle`, not part of `make bench`)"


def block_marks(broker: str) -> tuple[str, str]:
    return f"<!-- bench.idle {broker} -->", f"<!-- /bench.idle {broker} -->"


def kept_blocks(text: str) -> str:
    """The idle benchmark's blocks of a BENCHMARKS.md, for bench/run.py to write again."""
    blocks = []
    for broker in ("redis", "rabbitmq"):
        begin, end = block_marks(broker)
        if begin in text and end in text:
            blocks.append(text[text.index(begin):text.index(end) + len(end)])
    return "\n\n".join(blocks)


def render(broker: str, results: list[dict[str, Any]], command: str) -> str:
    from bench.common import BROKER_TITLES

    title, about, first = BROKER_TITLES[broker], machine(), results[0]
    s = first["settings"]
    knobs = (f"AMQP heartbeat {s['amqp_heartbeat_s']} s (negotiated)" if broker == "rabbitmq" else
             f"BRPOP timeout (kombu's `polling_interval`, `BERTH_GUEST_POLLING_INTERVAL_S`) {s['brpop_timeout_s']:g} s,"
             f" unacked check every {s['heal_every_s']:g} s")
    lines = [block_marks(broker)[0], f"### Idle guests, {title}", "",
             f"Written by `{command}` on {first.get('date', about['date'])} ({about['machine']}). Knobs: {knobs}, "
             f"guest heartbeat (`BERTH_HEARTBEAT_INTERVAL_S`) every {s['heartbeat_interval_s']:g} s.", "",
             "| guests asked | held (ceiling) | broker CPU, % of one core: idle broker / guests polling / "
             "with heartbeats | for the guests asked (linear) | heartbeat path (store) | memory per guest | "
             "ping p50 (p99): idle broker / with guests | < 10 % of a core |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, base, cpu = r["summary"], r["baseline"], r["heartbeats"]["cpu_pct_of_one_core"]
        store = f" (store beside it: {cpu['store']:.1f} %)" if "store" in cpu else ""
        lines.append(
            f"| {r['guests_asked']:,} | {r['guests']:,} ({r['ceiling']:,}) | "
            f"{base['idle']['cpu_pct_of_one_core']['broker']:.1f} / "
            f"{r['polling']['cpu_pct_of_one_core']['broker']:.1f} / {cpu['broker']:.1f}{store} | "
            f"{m['broker_cpu_pct_for_guests_asked']:.1f} | "
            f"{m['heartbeat_path_cpu_pct']:+.1f} % of a core | "
            + ", ".join(f"{name} {mib * 1024:.0f} KiB" for name, mib in m["mib_per_guest"].items())
            + f" | {base['ping']['p50_ms']:.1f} ({base['ping']['p99_ms']:.1f}) / {r['ping_while_idle']['p50_ms']:.1f}"
            f" ({r['ping_while_idle']['p99_ms']:.1f}) ms | {'**met**' if m['goal_10pct_met'] else '**not met**'} |")
    lines += ["", "Share of the traffic the guests owe the broker by their settings that it received (heartbeat "
              "window): " + "; ".join(f"{r['guests']:,} guests: " + ", ".join(
                  f"{name} {pct:.0f} %" for name, pct in r["summary"]["traffic_delivered_pct"].items())
                  for r in results) + "."]
    per_guest, where = ((STORE_CONNECTIONS_BESIDE_RABBITMQ, "the Redis store beside the node (the node holds one)")
                        if broker == "rabbitmq" else (REDIS_CONNECTIONS, "the broker"))
    lines += ["", f"Ceiling here: {first['ceiling']:,} guests. A process holds at most its hard RLIMIT_NOFILE, "
              f"{first['fd_limit']:,} on this machine (raising it needs CAP_SYS_RESOURCE), and each guest holds "
              f"{per_guest} connections to {where}."]
    if "calibration" in first:
        c = first["calibration"]
        lines += ["", f"Calibration ({c['window_s']:g} s, one fake beside one real agent; "
                  f"{'they match' if c['match'] else 'they DIFFER'}): real agent {json.dumps(c['real_agent'])}; "
                  f"fake {json.dumps(c['fake'])}."]
    lines.append(block_marks(broker)[1])
    return "\n".join(lines)


def write_block(path: Path, broker: str, block: str) -> None:
    """Put this broker's block in BENCHMARKS.md, in place of the last one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = block_marks(broker)
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        heading = "" if IDLE_HEADING in text else f"{IDLE_HEADING}\n\n"
        text = text.rstrip("\n") + "\n\n" + heading + block + "\n"
    path.write_text(text)


def delivered(result: dict[str, Any]) -> dict[str, float]:
    """How much of the idle traffic N guests owe the broker (by their settings) it received in the
    heartbeat window, in %: a fake that fell behind, or a connection the broker refused, shows here."""
    n, s, on_rabbitmq = result["guests"], result["settings"], result["broker"] == "rabbitmq"
    seen, base = result["heartbeats"]["store_calls_per_s"], result["baseline"]["idle"]["store_calls_per_s"]
    owed = {"rpush": n / s["heartbeat_interval_s"]}  # one report (one RPUSH) a guest
    if not on_rabbitmq:
        owed.update(brpop=n / s["brpop_timeout_s"], zrange=n / s["heal_every_s"])  # its poll, its unacked check
    names = {"rpush": "heartbeats", "brpop": "polls", "zrange": "unacked checks"}
    return {names[c]: round(100 * (seen.get(c, 0) - base.get(c, 0)) / rate, 1) for c, rate in owed.items()}


# --- Several N, each in a process of its own ----------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    broker_option(parser)
    parser.add_argument("--guests", default="1000,10000", help="comma-separated numbers of idle guests")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each CPU measurement")
    parser.add_argument("--pings", type=int, default=30, help="pings of the real guest, before and under load")
    parser.add_argument("--calibrate", type=float, default=30.0,
                        help="seconds of the real-agent-versus-fake check (first N only; 0: none)")
    parser.add_argument("--write", type=Path, default=None, help="put the figures in this BENCHMARKS.md")
    args = parser.parse_args()
    sizes = [int(n) for n in args.guests.split(",")]
    if len(sizes) == 1 and args.write is None:
        print(json.dumps(run(args.broker, sizes[0], args.window, args.pings, args.calibrate), indent=2))
        return 0
    results, failed = [], False
    for i, n in enumerate(sizes):
        print(f"bench.idle: {n} guests on {args.broker} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "bench.idle", "--broker", args.broker, "--guests", str(n),
                               "--window", str(args.window), "--pings", str(args.pings),
                               "--calibrate", str(args.calibrate if i == 0 else 0)],
                              cwd=PROJECT, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-5000:], sep="\n", file=sys.stderr)
            print(f"bench.idle: {n} guests on {args.broker} failed (exit {done.returncode})", file=sys.stderr)
            failed = True
            continue
        results.append(json.loads(done.stdout))
    print(json.dumps(results, indent=2))
    if args.write is not None and results:
        write_block(args.write, args.broker, render(args.broker, results, "make bench-idle"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
