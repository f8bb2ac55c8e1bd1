"""Transparent huge pages for host memory: the commands restart themselves once with glibc's `hugetlb` tunable.

XLA's CPU runtime allocates each compiled step's scratch memory afresh on every call (784 MiB for the step of
bench/compare_torch.py) and glibc hands blocks that large straight to mmap and back to the kernel on free, so
every step faults in 4 KiB pages one by one: 210,000 page faults and 300 ms of kernel time a step on a 2-core
Intel machine (docs/results.md). With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc asks for transparent huge
pages (2 MiB) on those blocks, and the same step takes 900 faults and 126 ms of kernel time: 15% off the step.

The tunable is read once, when the process starts, so it cannot be switched on from inside a running program:
`reexec_with_huge_pages()`, called by every command before it imports jax, replaces the process by the same
command line with the tunable added (same PID, same arguments, same environment otherwise). It does nothing
where it cannot help: not Linux, not glibc >= 2.35, the kernel's THP setting not `madvise` (with `always` every
block already gets huge pages; with `never` none can), the tunable already set, or `GPTJAX_HUGE_PAGES=0`.
Library code never calls it: importing gptjax in a notebook or a test restarts nothing.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GPTJAX_HUGE_PAGES"  # =0: never restart
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_at_least(major: int, minor: int) -> bool:
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return False
    try:
        have = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


def _thp_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def wanted(environ=None, thp_path: str = THP_SETTING) -> bool:
    """Whether restarting with the tunable would change anything here."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or not _glibc_at_least(2, 35):
        return False
    return _thp_mode(thp_path) == "madvise"


def environment(environ=None) -> dict:
    """A copy of the environment with the tunable added to any GLIBC_TUNABLES already set."""
    env = dict(os.environ if environ is None else environ)
    env["GLIBC_TUNABLES"] = f"{env['GLIBC_TUNABLES']}:{TUNABLE}" if env.get("GLIBC_TUNABLES") else TUNABLE
    return env


def reexec_with_huge_pages() -> None:
    """Restart this command with glibc's huge-page tunable, once, before any heavy import (see the module doc).
    Returns normally (doing nothing) where it would not help or the command line cannot be replayed."""
    if not wanted():
        return
    argv = list(getattr(sys, "orig_argv", []) or [])
    if len(argv) < 2 or argv[1] in ("-c", "-") or not sys.executable:  # nothing to replay
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:
        os.execve(sys.executable, [sys.executable] + argv[1:], environment())
    except OSError:  # could not restart: carry on as we are
        return
