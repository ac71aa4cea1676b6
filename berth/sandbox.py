"""A guest's view of the host's files, and its own OS user: the last step before the guest agent.

    python -m berth.sandbox --uid U --gid G --expose PATH ... -- COMMAND ...

Runs as root inside the guest's namespaces (`ip netns exec` gives it a mount namespace of its
own, whose mounts the host never sees). Every folder on the way to an exposed path that other
users may not pass through (``/root`` holding the Python install, a private temporary folder),
and each ``--hide`` folder (BERTH_HOME, the guests' folder), is covered with an empty tmpfs, and
only the entries on the way to exposed paths are put back, by bind mounts: the guest sees its
interpreter, the project, its own disk, and nothing else of those folders (no master key, no
other guest's disk, not even their names). Then it drops to uid/gid, without supplementary
groups, and execs COMMAND: the process keeps its pid.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import stat
import sys
from pathlib import Path

MS_BIND = 4096
MS_REC = 16384
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _passable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXOTH)


def expose(paths: list[Path], hide: tuple[Path, ...] | list[Path] = ()) -> None:
    """Make each of ``paths`` reachable by other users (see the module's docstring); folders of
    ``hide`` on their way are covered even when others may pass through them."""
    wanted = [Path(os.path.realpath(p)) for p in paths]
    hidden = {Path(os.path.realpath(p)) for p in hide}
    # Folder -> the names in it on the way to a wanted path, outermost folders first.
    ways: dict[Path, set[str]] = {}
    for path in wanted:
        for depth in range(1, len(path.parts)):
            ways.setdefault(Path(*path.parts[:depth]), set()).add(path.parts[depth])
    for folder in sorted(ways, key=lambda p: len(p.parts)):
        if folder == Path("/") or (_passable(folder) and folder not in hidden):
            continue
        handles = {name: os.open(folder / name, os.O_PATH) for name in ways[folder] if (folder / name).exists()}
        _mount("tmpfs", str(folder), "tmpfs", 0, "mode=711,size=64k")
        for name, fd in handles.items():
            target = folder / name
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                target.mkdir()
            else:
                target.touch()
            _mount(f"/proc/self/fd/{fd}", str(target), None, MS_BIND | MS_REC, None)
            os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m berth.sandbox")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--expose", type=Path, action="append", default=[])
    parser.add_argument("--hide", type=Path, action="append", default=[],
                        help="a folder whose other entries the guest must not even see")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.uid <= 0 or args.gid <= 0:
        parser.error("a command to run, as a uid and gid other than root's")
    expose(args.expose, args.hide)
    os.setgroups([])
    os.setgid(args.gid)
    os.setuid(args.uid)
    os.umask(0o077)
    os.execv(command[0], command)


if __name__ == "__main__":
    try:
        main()
    except OSError as exc:
        sys.exit(f"berth.sandbox: {exc}")
