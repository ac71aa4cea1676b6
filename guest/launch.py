"""What the `local` boot driver runs: wait out the boot delay, then become the guest agent.

    python -m guest.launch --instance-id ID [--boot-delay S]

The process keeps its pid through exec, so the driver's pidfile names the agent itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from berth.ids import INSTANCE_ID_FORMAT, INSTANCE_ID_RE
from berth.paths import AGENT_PIDFILE, guest_dir


def agent_command(instance_id: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "guest", "worker", "--instance-id", instance_id,
            "--pool", "solo", "--concurrency", "1", "--hostname", f"guest-{instance_id}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guest.launch")
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--boot-delay", type=float, default=0.0, help="seconds to wait, like a slow VM")
    args = parser.parse_args(argv)
    if not INSTANCE_ID_RE.fullmatch(args.instance_id):
        parser.error(f"--instance-id {args.instance_id!r}: expected {INSTANCE_ID_FORMAT}")
    # The driver writes this too, right after it starts us; writing it first closes the gap.
    pidfile = guest_dir(args.instance_id) / AGENT_PIDFILE
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(str(os.getpid()))
    time.sleep(max(0.0, args.boot_delay))
    command = agent_command(args.instance_id)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
