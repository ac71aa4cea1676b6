"""`make bench`: every benchmark, then their table in BENCHMARKS.md.

    .venv/bin/python -m bench.run [--quick] [--out BENCHMARKS.md]

Each benchmark runs on its own private stack and measures its own baseline in the same run
(these machines are noisy: compare ratios, not absolute figures across runs). Latency, fast
fail and the wave run on both brokers, Redis and RabbitMQ (a private node, with a Redis beside
it for records and results), one after the other, each against its baseline on that same
broker; the polling baseline runs on Redis only. ``--quick`` runs
small sizes (a smoke test of the harness, not figures to publish) and writes no file unless
``--out`` names one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_BROKERS, BROKER_TITLES, machine
from bench.idle import IDLE_HEADING, kept_blocks

PROJECT = Path(__file__).resolve().parent.parent
# Measured on Redis only: the polling baseline (5), a comparison with Trove's poll, not a target.
REDIS_ONLY = ("polling",)
# Measured on each broker of BENCH_BROKERS, each against its own baseline on that broker.
BOTH = ("footprint", "fastfail", "latency", "concurrency")


def mark(met: bool) -> str:
    return "**met**" if met else "**not met**"


def lower_bound(probe: dict[str, Any]) -> str:
    """A note for a probe whose figures are lower bounds (some probes timed out)."""
    lost = int(probe.get("errors_or_timeouts", 0))
    return f" ({lost} timed out at 30 s: lower bounds)" if lost else ""


def latency_row(title: str, lat: dict[str, Any]) -> str:
    return (f"| 1. provision -> ACTIVE, live guest, noop datastore (n={lat['provision_to_active']['n']}) | {title} | "
            f"p50 {lat['provision_to_active']['p50_ms']:.1f} ms, p99 {lat['provision_to_active']['p99_ms']:.1f} ms | "
            f"bare Celery round trip p50 {lat['bare_round_trip']['p50_ms']:.2f} ms, "
            f"p99 {lat['bare_round_trip']['p99_ms']:.2f} ms | {lat['ratio_p50']:.1f} x | p50 <= 6 x | "
            f"{mark(lat['target']['met'])} |")


def fastfail_rows(title: str, ff: dict[str, Any]) -> list[str]:
    return [f"| 2. fast fail, no guest, ping {key.removeprefix('deadline_')} deadline (n={value['n']}): FAILED "
            f"after the deadline | {title} | p50 {value['p50_ms']:.0f} ms, p99 {value['p99_ms']:.0f} ms | "
            f"Trove: 1,800 s timeout, checked every 5 s | | p99 <= 1 s | {mark(ff['target']['met'])} |"
            for key, value in ff.items() if key.startswith("deadline_")]


def wave_rows(title: str, conc: dict[str, Any]) -> list[str]:
    wave, bare, tg = conc["wave"], conc["bare"], conc["targets"]
    ratio = tg["throughput_ratio"]["value"]
    p99_s = wave["time_to_active"].get("p99_s", 0.0)
    return [
        f"| 3a. {wave['instances']} provisionings at once, taskmanager with 2 processes, fleet guests | {title} | "
        f"{wave['provision_rate_per_s']:.1f} provisionings/s, p99 to ACTIVE {p99_s:.1f} s, "
        f"{wave['active']} ACTIVE, {wave['failed']} FAILED | bare tasks {bare['rate_per_s']:.0f}/s | "
        f"1/{1 / ratio if ratio else float('inf'):.1f} | >= 1/6 | {mark(tg['throughput_ratio']['met'])} |",
        f"| 3b. probe task to the taskmanager during the wave (n={conc['probe_wave']['n']}) | {title} | "
        f"p50 {conc['probe_wave'].get('p50_ms', 0):.1f} ms, p99 {conc['probe_wave'].get('p99_ms', 0):.1f} ms"
        f"{lower_bound(conc['probe_wave'])} | idle: p50 {conc['probe_idle'].get('p50_ms', 0):.1f} ms, "
        f"p99 {conc['probe_idle'].get('p99_ms', 0):.1f} ms | | p99 <= 50 ms | {mark(tg['probe_p99_ms']['met'])} |",
        f"| 3c. taskmanager CPU (main process and pool, user + system) per provisioning in the wave | {title} | "
        f"{wave.get('taskmanager_cpu_ms_per_provisioning', 0):.1f} ms | per bare task "
        f"{bare.get('taskmanager_cpu_ms_per_task', 0):.2f} ms | {tg['cpu_ratio']['value']:.1f} x | <= 6 x | "
        f"{mark(tg['cpu_ratio']['met'])} |",
    ]


def footprint_rows(title: str, fp: dict[str, Any]) -> list[str]:
    return [
        f"| 4a. guest agent: start to first pong (median of {fp['runs']}) | {title} | "
        f"{fp['guest_agent']['start_to_pong_ms']:.0f} ms | bare `celery worker --pool solo`: "
        f"{fp['bare_worker']['start_to_pong_ms']:.0f} ms | {fp['ratio_time']:.2f} x | <= 1.1 x | "
        f"{mark(fp['ratio_time'] <= 1.1)} |",
        f"| 4b. guest agent: resident memory after first pong | {title} | {fp['guest_agent']['rss_mib']:.1f} MiB | "
        f"bare solo worker: {fp['bare_worker']['rss_mib']:.1f} MiB | {fp['ratio_rss']:.2f} x | <= 1.1 x | "
        f"{mark(fp['ratio_rss'] <= 1.1)} |",
    ]


def polling_row(poll: dict[str, Any]) -> str:
    return (f"| 5. prepare done -> instance seen ACTIVE (n={poll['instances']}, prepare 0-5 s) | Redis only | "
            f"p50 {poll['berth']['p50_ms']:.1f} ms, p99 {poll['berth']['p99_ms']:.1f} ms | Trove-style 5 s poll: "
            f"p50 {poll['trove_5s_poll']['p50_ms']:.0f} ms, p99 {poll['trove_5s_poll']['p99_ms']:.0f} ms | "
            f"{poll['ratio_p50']:.0f} x faster | (none) | |")


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """One row per benchmark and broker, each broker's pair next to each other."""
    brokers = [b for b in BENCH_BROKERS if b in results]
    rows = ["| benchmark | broker | Berth | baseline (same run, same broker) | ratio | target | |",
            "|---|---|---|---|---|---|---|"]
    rows += [latency_row(BROKER_TITLES[b], results[b]["latency"]) for b in brokers]
    for b in brokers:
        rows += fastfail_rows(BROKER_TITLES[b], results[b]["fastfail"])
    waves = [wave_rows(BROKER_TITLES[b], results[b]["concurrency"]) for b in brokers]
    rows += [w[0] for w in waves] + [w[1] for w in waves] + [w[2] for w in waves]
    footprints = [footprint_rows(BROKER_TITLES[b], results[b]["footprint"]) for b in brokers]
    rows += [f[0] for f in footprints] + [f[1] for f in footprints]
    rows.append(polling_row(results["redis"]["polling"]))
    return rows


def step_table(title: str, per_task: dict[str, Any]) -> list[str]:
    """Per step of the latency run: runs per provisioning, and per run the round trips and slot time."""
    tasks = per_task.get("tasks", {})
    if not tasks:
        return []
    lines = ["", f"  Per step, {title} (`bench/latency.py`, counted by `berth/roundtrips.py` in the taskmanager;"
             " a slot runs from the task's start to its end, result and next publish included):", "",
             "  | task | runs per provisioning | Redis round trips per run | AMQP round trips per run |"
             " management API calls per run | slot time per run |", "  |---|---|---|---|---|---|"]

    def row(name: str, f: dict[str, Any], runs: str) -> str:
        return (f"  | {name} | {runs} | {f['redis']:.1f} | {f['amqp']:.1f} | {f['http']:.1f} |"
                f" {f['slot_ms']:.2f} ms |")
    for name, figures in tasks.items():
        if name.startswith("taskmanager."):
            lines.append(row(f"`{name}`", figures, f"{figures['runs_per_provisioning']:.2f}"))
    whole = per_task["provisioning"]
    lines.append(f"  | a whole provisioning | | {whole['redis']:.1f} | {whole['amqp']:.1f} | {whole['http']:.1f} |"
                 f" {whole['slot_ms']:.2f} ms |")
    if "celery.accumulate" in tasks:
        lines.append(row("bare task (`celery.accumulate`)", tasks["celery.accumulate"], "-"))
    lines.append("")
    return lines


def floor_lines(title: str, lat: dict[str, Any]) -> list[str]:
    """The latency floor of the chain, and what this run's steps add to it."""
    per_task = lat.get("per_task", {})
    bare = per_task.get("tasks", {}).get("celery.accumulate")
    whole = per_task.get("provisioning")
    if not bare or not whole:
        return []
    added = whole["slot_ms"] - whole["runs"] * bare["slot_ms"]
    return [f"- **The floor, {title}**: six hops (four tasks, two guest round trips), each at least one bare round"
            f" trip: 6 x, the target itself. This run: {lat['ratio_p50']:.1f} x. Its steps held a worker slot"
            f" {whole['slot_ms']:.1f} ms per provisioning, {added:.1f} ms more than {whole['runs']:.0f} bare tasks"
            f" ({bare['slot_ms']:.2f} ms each): the round trips of the table below, {whole['redis']:.0f} to Redis"
            + (f", {whole['amqp']:.0f} AMQP and {whole['http']:.0f} management API calls" if whole["amqp"] else "")
            + f" against {bare['redis'] + bare['amqp']:.0f} for a bare task; that difference is what stands"
            " between this run and the floor."]


def latency_lines(title: str, lat: dict[str, Any]) -> list[str]:
    hops = lat["steps_p50_ms"]
    lines = [
        f"- **Latency, {title}**, p50 of each segment of one provisioning (ms): "
        + ", ".join(f"{name} {value:.1f}" for name, value in hops.items())
        + f"; the bare round trip is {lat['bare_round_trip']['p50_ms']:.2f} ms. The chain is four tasks"
        " (create_queue, ping_guest, send_prepare, verify) and two guest round trips"
        " (ping, prepare); each hop costs about one bare round trip, whatever the step does.",
        *floor_lines(title, lat),
        *step_table(title, lat.get("per_task", {})),
    ]
    store = lat.get("broker_round_trip", {})
    amqp = lat.get("amqp_round_trip", {})
    if store and not amqp:
        lines.append(
            f"- **Redis: the broker answers a write after its fsync** (`appendfsync always`, so that a killed broker"
            f" loses no acknowledged message): a read round trip p50 {store['read_ping']['p50_ms']:.3f} ms, a write"
            f" {store['write_set']['p50_ms']:.3f} ms. A step makes several writes one after the other (its"
            " record, its marks, the message it sends, its result, its ack); a bare task makes few.")
    elif amqp:
        lines.append(
            f"- **{title}: every publish waits for its confirm** (persistent message, durable queue): a passive"
            f" declare p50 {amqp['read_passive_declare']['p50_ms']:.3f} ms, a confirmed publish"
            f" {amqp['write_publish_confirm']['p50_ms']:.3f} ms; the Redis beside it (records, results, fsync on"
            f" every write) answers a read in {store['read_ping']['p50_ms']:.3f} ms and a write in"
            f" {store['write_set']['p50_ms']:.3f} ms. A step writes to both, one after the other.")
    return lines


def wave_lines(title: str, conc: dict[str, Any]) -> list[str]:
    lines = []
    times = conc.get("wave_task_times", {})
    steps = {k.removeprefix("taskmanager."): v for k, v in times.items() if k.startswith("taskmanager.")}
    if steps:
        runs = {k: v.get("succeeded", 0) + v.get("retried", 0) + v.get("failed", 0) for k, v in steps.items()}
        slot_ms = sum(v["busy_s"] for v in steps.values()) * 1000 / max(1, conc["wave"]["instances"])
        bare_ms = conc.get("bare_task_times", {}).get("celery.accumulate", {}).get("mean_ms")
        lines.append(
            f"- **Throughput, {title}**: {slot_ms:.0f} ms of worker-slot time per provisioning in the wave ("
            + ", ".join(f"{k} {v['mean_ms']:.1f} ms x {runs[k]}" for k, v in steps.items())
            + (f"), against {bare_ms:.1f} ms for a bare task" if bare_ms else ")")
            + f". The two cores are shared with the broker, the fleet process that plays {conc['wave']['instances']}"
            " guests, and the benchmark's own probe and event reader; the bare task rate is measured without the"
            " fleet. Its floor is 1/4 of the bare rate (four tasks per provisioning, each at least a bare task's"
            " slot), less what the fleet takes of the cores; the steps' slot time above a bare task's, their"
            " round trips, is what stands between this run and it.")
    cpu = conc["wave"].get("taskmanager_cpu_ms_per_provisioning")
    per_task = conc["bare"].get("taskmanager_cpu_ms_per_task")
    if cpu and per_task:
        lines.append(
            f"- **Taskmanager CPU, {title}**: {cpu:.1f} ms per provisioning, {cpu / per_task:.1f} x a bare task's"
            f" {per_task:.2f} ms. Its floor is above 4 x: four tasks, each at least a bare task's CPU, plus"
            " the sends that a bare task's client makes outside the taskmanager (three next steps and two"
            " guest messages, each with its `task-sent` event); the rest is the steps' round trips, counted"
            " above.")
    redis_busy = conc.get("wave_redis_time", {})
    if redis_busy:
        what = "Redis store, beside RabbitMQ" if conc.get("broker", "redis") != "redis" else "Broker, Redis"
        lines.append(f"- **{what}**: busy {redis_busy['busy_s']:.1f} s of the wave"
                     f" ({redis_busy['busy_share_of_wave'] * 100:.0f} %); its top commands are in the raw results.")
    if conc.get("broker", "redis") != "redis":
        lines.append(f"- **Probe, {title}**: {conc.get('priority', {}).get('note', '')}")
    return lines


def profile(results: dict[str, dict[str, Any]]) -> list[str]:
    """Where the time went in this run, from its own figures: the why of a target not met."""
    lines = ["## Where the time goes (this run)", ""]
    brokers = [b for b in BENCH_BROKERS if b in results]
    for b in brokers:
        lines += latency_lines(BROKER_TITLES[b], results[b]["latency"])
    for b in brokers:
        lines += wave_lines(BROKER_TITLES[b], results[b]["concurrency"])
    lines.append("")
    return lines


def write(results: dict[str, Any], about: dict[str, str], command: str, seconds: float, out: Path) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` (`bench/run.py`) on {about['date']}, in {seconds:.0f} s.",
        "",
        f"- machine: {about['machine']}",
        f"- Python {about['python']}; {about['versions']}",
        "- every figure's baseline was measured in the same run, on the same broker; compare the ratios",
        "- brokers: Redis (the embedded `redis-server`, AOF with `appendfsync always`: broker and store at once);"
        " RabbitMQ (a private node, durable classic queues, publisher confirms on every publish; instance records"
        " and results in an embedded Redis beside it); row 5 was measured on Redis only",
        "",
        *table(results),
        "",
        *profile(results),
        "What each row measures, and how: the docstrings of `bench/latency.py`, `bench/fastfail.py`,",
        "`bench/concurrency.py` (with `bench/fleet.py`), `bench/footprint.py` and `bench/polling.py`.",
        "Everything the run printed is kept below.",
        "",
        "<details><summary>raw results</summary>",
        "",
        "```json",
        json.dumps(results, indent=2, sort_keys=True),
        "```",
        "",
        "</details>",
        "",
    ]
    # The idle-guest figures come from `make bench-idle` (bench/idle.py), not from this run: kept as they are.
    kept = kept_blocks(out.read_text()) if out.exists() else ""
    if kept:
        lines += [IDLE_HEADING, "", kept, ""]
    out.write_text("\n".join(lines))


def sizes(quick: bool) -> dict[str, list[str]]:
    """Each benchmark's options, on either broker."""
    return {
        "footprint": ["--runs", "2" if quick else "11"],
        "polling": ["--instances", "5" if quick else "20"],
        "fastfail": ["--instances", "5" if quick else "20"],
        "latency": ["--instances", "20" if quick else "200", "--round-trips", "50" if quick else "300"],
        "concurrency": ["--instances", "50" if quick else "1000"],
    }


def plan(quick: bool) -> list[tuple[str, str, list[str]]]:
    """(broker, benchmark, options), the brokers of one benchmark one after the other: the same
    conditions of the machine for both, as far as a noisy machine allows."""
    options = sizes(quick)
    steps = [("redis", name, options[name]) for name in REDIS_ONLY]
    for name in BOTH:
        steps += [(broker, name, [*options[name], "--broker", broker]) for broker in BENCH_BROKERS]
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="small sizes: check the harness, publish nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the table (default: BENCHMARKS.md; with --quick, nowhere)")
    args = parser.parse_args()
    started = time.monotonic()
    quick = args.quick
    results: dict[str, dict[str, Any]] = {broker: {} for broker in BENCH_BROKERS}
    # Each in its own process: a benchmark's private broker is read by `tasks` at import.
    for broker, name, options in plan(quick):
        t = time.monotonic()
        print(f"bench: {name} {' '.join(options)} ...", flush=True)
        done = subprocess.run([sys.executable, "-m", f"bench.{name}", *options], cwd=PROJECT, capture_output=True,
                              text=True)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"bench: {name} on {broker} failed (exit {done.returncode})")
        results[broker][name] = json.loads(done.stdout)
        print(f"bench: {name} on {broker} done in {time.monotonic() - t:.0f} s", flush=True)
    command = "make bench" if not quick else "python -m bench.run --quick"
    out = args.out or (None if quick else PROJECT / "BENCHMARKS.md")
    print("\n".join(table(results)))
    if out is not None:
        write(results, machine(), command, time.monotonic() - started, out)
        print(f"bench: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
