"""Everything a guest writes is hostile bytes: bounded, decoded, parsed and cleaned here.

A guest's broker user may write a few keys and channels of its own (berth/brokers/redis/acl.py): its
queue, its results and their channels, its dead letters, its heartbeats, its ack-emulation keys.
The control plane reads them, and whatever it reads from there goes through this module first:

- size is bounded on the broker, before anything is read (`read_bounded`: GETRANGE returns at
  most the limit plus one byte), or, for what arrives on its own (a publish), checked before it
  is parsed; the broker itself refuses any value over ``proto-max-bulk-len`` (berth/redis_server.py);
- bytes are decoded strictly as UTF-8, JSON is parsed with a nesting limit and without NaN or
  Infinity (`decode_json`);
- every string that may reach a record, a log line, Flower or a terminal has its control
  characters escaped (`clean`, `escape`), so a guest cannot forge a log line or clear a screen;
- one guest's garbage is that guest's problem: callers fail per instance and log it once in a
  while (`RateLimitedLog`), never for the whole pass.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from berth.errors import Malformed

# The largest result a guest may store and have read (a ping, prepare's answer, a guest-API
# answer such as list_users), in bytes of its Celery result document.
MAX_ANSWER_BYTES = 256 * 1024
# The largest heartbeat report and dead-letter entry read, in bytes.
MAX_REPORT_BYTES = 4096
MAX_DEADLETTER_BYTES = 4096
# Deepest nesting of lists and objects accepted in anything a guest wrote.
MAX_DEPTH = 16
# Longest text of a guest's that goes on one line (an error, a version), in characters.
MAX_LINE_CHARS = 300
# One complaint per guest and kind in this many seconds; the rest are counted, not logged.
WARN_EVERY_S = 60.0


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every character that is not printable (controls, line and paragraph
    separators, invisible formatting such as bidi overrides) written as an escape: ``\\x1b``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def one_line(text: object, limit: int = MAX_LINE_CHARS) -> str:
    """Any value as one escaped line of at most ``limit`` characters."""
    line = escape(text if isinstance(text, str) else str(text))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def as_text(raw: bytes | str, what: str) -> str:
    """Strict UTF-8; Malformed naming ``what`` otherwise."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed(f"{what} is not UTF-8 (byte {exc.start})") from None


def _refuse_constant(name: str) -> Any:
    raise Malformed(f"{name} is not a JSON number")


def depth(value: Any) -> int:
    """Nesting depth of lists and objects (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def decode_json(raw: bytes | str | None, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON a guest wrote: at most ``max_bytes``, UTF-8, nested at most ``max_depth``."""
    if raw is None:
        raise Malformed(f"{what} is missing")
    if len(raw) > max_bytes:
        raise Malformed(f"{what} is over {max_bytes} bytes")
    text = as_text(raw, what)
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise Malformed(f"{what} is nested deeper than {max_depth}") from None
    except ValueError as exc:
        raise Malformed(f"{what} is not JSON ({one_line(exc, 80)})") from None
    if depth(value) > max_depth:
        raise Malformed(f"{what} is nested deeper than {max_depth}")
    return value


def clean(value: Any) -> Any:
    """Parsed JSON with every string (keys too) escaped; numbers, booleans and None as they are."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list):
        return [clean(item) for item in value]
    if isinstance(value, dict):
        return {escape(str(k)): clean(v) for k, v in value.items()}
    return value


def read_bounded(client: redis.Redis, key: str, max_bytes: int, what: str) -> bytes | None:
    """A string value of at most ``max_bytes``, or None if there is none (or it is empty); bounded on the broker.

    GETRANGE sends at most ``max_bytes + 1`` bytes whatever the value's size: one more than the
    limit means it is too large. A key of another type (a guest may make its result key a list)
    is Malformed. ``client`` must not decode responses (a guest's bytes need not be UTF-8).
    """
    try:
        raw = client.getrange(key, 0, max_bytes)
    except redis.ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            raise Malformed(f"{what} is not a string value") from None
        raise
    if not raw:
        return None  # no key, or an empty value: nothing anyone stored is there to read
    if len(raw) > max_bytes:
        raise Malformed(f"{what} is over {max_bytes} bytes")
    return raw if isinstance(raw, bytes) else raw.encode()


# KEYS: lists a guest writes. ARGV: first and last index (LRANGE's), the largest item to send, and
# 1 to delete each list as it is read (in the same atomic call). Per list: its items, each as its
# bytes or, when larger than allowed, as its length (never sent); {-1} when the key is no list.
_TAKE_LISTS = """
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local taken = {}
  if kind == 'list' then
    for j, item in ipairs(redis.call('LRANGE', key, tonumber(ARGV[1]), tonumber(ARGV[2]))) do
      if string.len(item) > tonumber(ARGV[3]) then taken[j] = string.len(item) else taken[j] = item end
    end
  elseif kind ~= 'none' then
    taken[1] = -1
  end
  if ARGV[4] == '1' and kind ~= 'none' then redis.call('DEL', key) end
  out[i] = taken
end
return out
"""
NOT_A_LIST = -1


def take_lists(client: redis.Redis, keys: list[str], first: int, last: int, max_bytes: int,
               delete: bool = False) -> list[list[bytes | int]]:
    """Items ``first..last`` of each list, each as bytes, or as its length (an int) when it is over
    ``max_bytes``, bounded on the broker; ``[NOT_A_LIST]`` for a key that is no list. ``delete``:
    the lists are deleted in the same atomic call (each item is then taken by one reader)."""
    if not keys:
        return []
    script = client.register_script(_TAKE_LISTS)
    return list(script(keys=keys, args=[first, last, max_bytes, 1 if delete else 0]))


def describe_oversized(length: int, what: str, max_bytes: int) -> str:
    """Why a `take_lists` item that came back as a length was not read."""
    return f"{what} is not a list" if length == NOT_A_LIST else f"{what} of {length} bytes is over {max_bytes}"


def list_length(client: redis.Redis, key: str) -> int:
    """LLEN that reads 0 for a key a guest made into something other than a list."""
    try:
        return int(client.llen(key))
    except redis.ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            return 0
        raise


class RateLimitedLog:
    """Warn about one source (a guest) once per ``every_s``; count what is held back."""

    def __init__(self, logger: logging.Logger, every_s: float = WARN_EVERY_S) -> None:
        self.logger, self.every_s = logger, every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, source: str, message: str, *args: Any) -> bool:
        """Log ``message`` for ``source`` unless it was logged within ``every_s``; True if logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(source, -self.every_s) < self.every_s:
                self._held[source] = self._held.get(source, 0) + 1
                return False
            self._last[source] = now
            held = self._held.pop(source, 0)
        suffix = f" ({held} more since the last such line)" if held else ""
        self.logger.warning(f"{message}{suffix} (further ones for %g s are not logged)", *args, self.every_s)
        return True
