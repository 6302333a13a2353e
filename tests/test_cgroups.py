"""Memory cgroups: reading this process's limits (on directory trees laid out as the kernel's), and
real capped cgroups where this machine lets the tests create them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sdk.cgroups import capped_cgroup, headroom, memory_cgroups
from edge_sdk.cgroups import available_memory

MIB = 2**20
UNLIMITED_V1 = "9223372036854771712"


def make_group(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text + "\n")


def v1(limit: str, usage: int, inactive_file: int = 0) -> dict[str, str]:
    return {"memory.limit_in_bytes": limit, "memory.usage_in_bytes": str(usage),
            "memory.stat": f"cache 0\ntotal_inactive_file {inactive_file}\ntotal_active_file 0"}


def v2(limit: str, usage: int, inactive_file: int = 0) -> dict[str, str]:
    return {"cgroup.controllers": "cpu memory pids", "memory.max": limit, "memory.current": str(usage),
            "memory.stat": f"anon {usage}\ninactive_file {inactive_file}"}


def test_v1_headroom_is_the_tightest_along_the_path_and_leaves_out_inactive_page_cache(tmp_path):
    # Prepare: this process in /a/b; b's own limit leaves 500 MiB, a's (which b's usage is part of) 100.
    make_group(tmp_path / "memory", v1(UNLIMITED_V1, 3000 * MIB))
    make_group(tmp_path / "memory/a", v1(str(800 * MIB), 700 * MIB))
    make_group(tmp_path / "memory/a/b", v1(str(1000 * MIB), 600 * MIB, inactive_file=100 * MIB))
    me = tmp_path / "self"
    me.write_text("9:name=systemd:/\n4:memory:/a/b\n1:cpu:/\n0::/\n")
    # Execute
    groups = memory_cgroups(tmp_path, me)
    # Assert
    assert [g.path for g in groups] == [tmp_path / "memory/a/b", tmp_path / "memory/a", tmp_path / "memory"]
    assert groups[0].usage() == 500 * MIB, "inactive page cache must not count as memory in use"
    assert groups[2].limit() is None, "v1's huge number means no limit"
    assert headroom(tmp_path, me) == 100 * MIB
    # Without a's limit, b's own is the tightest: 1000 - (600 - 100).
    (tmp_path / "memory/a/memory.limit_in_bytes").write_text(UNLIMITED_V1)
    assert headroom(tmp_path, me) == 500 * MIB


def test_v2_headroom_reads_the_processs_own_cgroup_not_the_mount_root(tmp_path):
    # Prepare: the root has no memory.max (as on a real v2 root); the process's cgroup is limited.
    make_group(tmp_path, {"cgroup.controllers": "cpu memory", "memory.stat": "anon 0"})
    make_group(tmp_path / "user.slice", v2("max", 2000 * MIB))
    make_group(tmp_path / "user.slice/app.scope", v2(str(1200 * MIB), 900 * MIB, inactive_file=50 * MIB))
    me = tmp_path / "self"
    me.write_text("0::/user.slice/app.scope\n")
    # Execute / Assert
    assert headroom(tmp_path, me) == 350 * MIB
    assert headroom(tmp_path, tmp_path / "no-such-file") is None


def test_a_v1_container_sees_its_own_cgroup_at_the_mount_root_under_the_hosts_name(tmp_path):
    # Without a cgroup namespace, /proc/self/cgroup names the host's path, which is not mounted here.
    make_group(tmp_path / "memory", v1(str(512 * MIB), 200 * MIB))
    me = tmp_path / "self"
    me.write_text("4:memory:/docker/0123abcd\n")
    assert headroom(tmp_path, me) == 312 * MIB


def test_no_limit_anywhere_gives_none_and_a_v2_path_on_a_v1_root_is_ignored(tmp_path):
    # A v1 machine also lists "0::/"; its root is a tmpfs without cgroup.controllers.
    make_group(tmp_path / "memory", v1(UNLIMITED_V1, 100 * MIB))
    make_group(tmp_path / "memory/a", v1(UNLIMITED_V1, 50 * MIB))
    me = tmp_path / "self"
    me.write_text("4:memory:/a\n0::/\n")
    assert [g.version for g in memory_cgroups(tmp_path, me)] == [1, 1]
    assert headroom(tmp_path, me) is None


def test_a_directory_that_is_not_a_cgroup_fs_gives_no_cap_and_is_left_as_it_was(tmp_path):
    make_group(tmp_path / "memory/a", {})  # a directory, but no control files: the kernel did not make it
    me = tmp_path / "self"
    me.write_text("4:memory:/a\n")
    assert capped_cgroup("child", 300 * MIB, tmp_path, me) is None
    assert list((tmp_path / "memory/a").iterdir()) == []


@pytest.fixture
def capped():
    """A real cgroup capped at 300 MiB under this process's own; skipped where the kernel refuses one."""
    group = capped_cgroup(f"hsplitlora-test-{os.getpid()}", 300 * MIB)
    if group is None:
        pytest.skip("this process may not create memory cgroups here (not root, no delegated cgroup v2 subtree)")
    yield group
    group.remove()


def run_in(group, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(group.command([sys.executable, "-c", code]), capture_output=True, text=True, timeout=120)


def test_a_process_in_a_capped_cgroup_sees_its_cap_as_available_memory(capped):
    assert available_memory() > 1024 * MIB, "the test needs a machine with more than 1 GiB free"
    out = run_in(capped, "from edge_sdk.cgroups import available_memory; print(available_memory())")
    assert out.returncode == 0, out.stderr
    seen = int(out.stdout.split()[-1])
    # The interpreter and torch (imported with edge_sdk.profile) hold part of the cap already.
    assert 0 < seen < 300 * MIB, f"a process capped at 300 MiB saw {seen / MIB:.0f} MiB available"
    assert capped.limit() == 300 * MIB


def test_a_process_over_its_cap_is_killed_and_the_kill_is_counted(capped):
    assert capped.oom_kills() == 0
    out = run_in(capped, "blocks = [bytearray(50 * 2**20) for _ in range(20)]")  # 1000 MiB, touched
    assert out.returncode == -9, f"expected a kill for memory, got status {out.returncode}: {out.stderr[-300:]}"
    assert capped.oom_kills() >= 1
