"""The `celery call` recipes of docs/guest-api.md, run exactly as written, against a private stack.

Each recipe is a ```console block after a ``<!-- recipe: NAME -->`` line in docs/guest-api.md: its ``$ ``
lines run one after another in one bash (so ``id=$(...)`` carries over), and what each prints
must match the lines the page shows under it, ids, ports and process ids aside.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from berth.paths import PROJECT_DIR
from berth.records import Records, Status
from tests.helpers import wait_for_status

RECIPE_RE = re.compile(r"<!-- recipe: (?P<name>[\w-]+) -->\s*```console\n(?P<body>.*?)```", re.S)
MARK = "\x1eberth-recipe-line\x1e"


def recipes() -> dict[str, list[tuple[str, list[str]]]]:
    """Each recipe's (command, expected output lines), in the page's order."""
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for match in RECIPE_RE.finditer((PROJECT_DIR / "docs" / "guest-api.md").read_text()):
        steps: list[tuple[str, list[str]]] = []
        for line in match["body"].splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps and line.strip():
                steps[-1][1].append(line)
        found[match["name"]] = steps
    return found


def pattern(expected: str) -> re.Pattern[str]:
    """The recipe's output line as a pattern: its ids, hex tags and numbers stand for any."""
    parts = re.split(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{12}|\d+)", expected)
    regex = "".join(re.escape(p) if i % 2 == 0 else r"[0-9a-f-]+" for i, p in enumerate(parts))
    return re.compile(regex)


def run(stack: Any, name: str) -> None:
    steps = recipes()[name]
    assert steps, f"docs/guest-api.md has no recipe {name!r}"
    script = "set -e\n" + "".join(f"echo '{MARK}'\n{command}\n" for command, _ in steps)
    env = {**stack.env, "PATH": f"{Path(sys.executable).parent}:{stack.env.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", script], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"recipe {name}: {done.stdout}\n{done.stderr}"
    outputs = done.stdout.split(MARK + "\n")[1:]
    assert len(outputs) == len(steps), done.stdout
    for (command, expected), output in zip(steps, outputs, strict=True):
        got = [line for line in output.splitlines() if line.strip()]
        assert len(got) == len(expected), f"$ {command}\ndocs/guest-api.md shows {expected}\nprinted {got}"
        for want, line in zip(expected, got, strict=True):
            assert pattern(want).fullmatch(line), f"$ {command}\ndocs/guest-api.md shows {want}\nprinted {line}"


def test_the_readmes_celery_call_recipes_work_as_written(stack: Any) -> None:
    assert {"provision", "guest-api", "delete"} <= set(recipes())
    stack.start_taskmanager()
    records = Records(stack.client())
    run(stack, "provision")
    record = wait_for_status(records, "db-1", [Status.ACTIVE, Status.FAILED])
    assert record.status is Status.ACTIVE, record.fields
    port = int(record["connection"]["port"])
    assert redis.Redis(port=port, username="app", password="app-pass-123").ping()

    run(stack, "guest-api")
    analyst = redis.Redis(port=port, username="analyst", password="an4lyst-pass-1")
    assert analyst.set("reports:q1", "42")

    run(stack, "delete")
    assert wait_for_status(records, "db-1", [Status.DELETED]).status is Status.DELETED
