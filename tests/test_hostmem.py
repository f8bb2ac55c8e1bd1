"""gptjax/hostmem.py: the commands restart themselves once with glibc's huge-page tunable, where it helps."""

import subprocess
import sys
import textwrap

from conftest import REPO, subprocess_env

from gptjax import hostmem


def _thp_file(tmp_path, text):
    path = tmp_path / "enabled"
    path.write_text(text)
    return str(path)


def test_wanted_only_where_the_tunable_changes_something(tmp_path, monkeypatch):
    monkeypatch.setattr(hostmem, "_glibc_at_least", lambda major, minor: True)
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    madvise = _thp_file(tmp_path, "always [madvise] never\n")
    assert hostmem.wanted({}, madvise)
    assert not hostmem.wanted({"GPTJAX_HUGE_PAGES": "0"}, madvise)  # the opt-out
    assert not hostmem.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, madvise)  # the user's own choice
    assert not hostmem.wanted({"GLIBC_TUNABLES": hostmem.TUNABLE}, madvise)  # already restarted: no loop
    assert hostmem.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise)
    assert not hostmem.wanted({}, _thp_file(tmp_path, "[always] madvise never\n"))  # huge pages already
    assert not hostmem.wanted({}, _thp_file(tmp_path, "always madvise [never]\n"))  # none to be had
    assert not hostmem.wanted({}, str(tmp_path / "missing"))
    monkeypatch.setattr(hostmem, "_glibc_at_least", lambda major, minor: False)
    assert not hostmem.wanted({}, madvise)  # glibc before 2.35 has no such tunable
    monkeypatch.setattr(hostmem, "_glibc_at_least", lambda major, minor: True)
    monkeypatch.setattr(hostmem.sys, "platform", "darwin")
    assert not hostmem.wanted({}, madvise)


def test_environment_keeps_the_tunables_already_set():
    assert hostmem.environment({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": hostmem.TUNABLE}
    env = hostmem.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostmem.TUNABLE


def test_a_command_restarts_once_with_the_same_pid_and_arguments(tmp_path):
    """The real thing, in a subprocess: where the tunable helps on this machine the script runs twice (same PID,
    same arguments, the tunable set the second time) and its big blocks then get huge pages; elsewhere once."""
    script = tmp_path / "cmd.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from gptjax.hostmem import reexec_with_huge_pages
        print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
        reexec_with_huge_pages()
        import ctypes
        def huge_kib():  # -1 where the kernel does not say
            try:
                return int([l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")][0].split()[1])
            except (OSError, IndexError):
                return -1
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        before, n = huge_kib(), 64 * 2**20  # 64 MiB: glibc maps it on its own, with the tunable advising THP
        block = libc.malloc(n)
        ctypes.memset(block, 1, n)
        huge = huge_kib() - before if before >= 0 else -1
        print("run", os.getpid(), sys.argv[1:], huge, bool(block))
    """))
    env = subprocess_env(1)
    for key in ("GLIBC_TUNABLES", hostmem.OPT_OUT):
        env.pop(key, None)
    out = subprocess.run([sys.executable, str(script), "a", "b c"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    starts = [line.split(" ", 2) for line in lines if line.startswith("start")]
    run = [line for line in lines if line.startswith("run")]
    assert len(run) == 1 and run[0].endswith("True")
    if hostmem.wanted(env):
        assert len(starts) == 2
        assert starts[0][1] == starts[1][1] and f"run {starts[0][1]} ['a', 'b c']" in run[0]  # exec: same PID
        assert starts[0][2] == "" and starts[1][2] == hostmem.TUNABLE
        huge_kib = int(run[0].split()[-2])
        if huge_kib >= 0:  # /proc/self/smaps_rollup readable: the block got 2 MiB pages (without the tunable: 0)
            assert huge_kib >= 2048, run[0]
    else:
        assert len(starts) == 1
    env[hostmem.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.count("start") == 1, out.stdout + out.stderr
