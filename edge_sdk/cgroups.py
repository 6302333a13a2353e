"""Memory cgroups: the limit this process runs under, and memory-capped cgroups for processes it starts.

Linux charges a process's memory (its anonymous pages, and the page cache of files it is first to
read) to its cgroup; a cgroup's limit bounds all of its processes together, and its ancestors'
limits bound it too. Past a limit the kernel reclaims page cache, then kills a process in the
cgroup. Two layouts of the cgroup filesystem (root: /sys/fs/cgroup):

- v2, one hierarchy at the root: /proc/self/cgroup names this process's cgroup on its `0::/path`
  line; memory.max ("max": no limit), memory.current, memory.stat, memory.events;
- v1, a hierarchy per controller, the memory one at <root>/memory, named on the
  `N:memory:/path` line; memory.limit_in_bytes (a huge number: no limit), memory.usage_in_bytes,
  memory.stat, memory.oom_control.

`headroom` is what this process can still be given: the least of limit less usage from its own
cgroup up to the mount root. Usage there leaves out inactive page cache, the part the kernel
reclaims first (as `docker stats` and the kubelet's working set do): a checkpoint read once must
not look like memory in use, and MemAvailable counts it as available too.

`capped_cgroup` makes a child of this process's memory cgroup with a limit, for a process started
with `MemoryCgroup.command` (it joins the cgroup before it execs, so all its memory is charged);
where this process may not create one (not root, no delegation), it returns None.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
SELF = Path("/proc/self/cgroup")
_UNLIMITED = 1 << 60  # v1 writes "no limit" as the page-aligned maximum of a 64-bit counter


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup: its directory and the layout (1 or 2) of its hierarchy."""

    path: Path
    version: int

    def _read(self, v1_name: str, v2_name: str) -> str | None:
        try:
            return (self.path / (v2_name if self.version == 2 else v1_name)).read_text()
        except OSError:
            return None

    def _stat(self, v1_name: str, v2_name: str, text: str | None) -> int | None:
        """A `key value` line of memory.stat, memory.events or memory.oom_control."""
        key = v2_name if self.version == 2 else v1_name
        for line in (text or "").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
        return None

    def limit(self) -> int | None:
        """The memory limit in bytes, or None when there is none (or it cannot be read)."""
        text = self._read("memory.limit_in_bytes", "memory.max")
        if text is None or text.strip() == "max" or int(text) >= _UNLIMITED:
            return None
        return int(text)

    def usage(self) -> int | None:
        """Bytes charged to this cgroup and its descendants, less inactive page cache (module docstring)."""
        text = self._read("memory.usage_in_bytes", "memory.current")
        if text is None:
            return None
        stat = self._read("memory.stat", "memory.stat")
        inactive = self._stat("total_inactive_file", "inactive_file", stat) or 0
        return max(int(text) - inactive, 0)

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this cgroup for exceeding its limit."""
        text = self._read("memory.oom_control", "memory.events")
        return self._stat("oom_kill", "oom_kill", text) or 0

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run so that its process joins this cgroup before it execs (nothing escapes the cap)."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {shlex.quote(str(procs))} && exec "$@"', "sh", *argv]

    def remove(self, timeout_s: float = 5.0) -> None:
        """Delete the cgroup once its processes have exited (their charges move to the parent)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY while a killed process is still being reaped
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def memory_cgroups(root: Path = ROOT, self_cgroup: Path = SELF) -> list[MemoryCgroup]:
    """This process's memory cgroup, then each ancestor up to the mount root, for each layout listed
    in `self_cgroup` whose memory controller is there under `root`.

    The mount root is kept even when the named path is not under it: a container without a cgroup
    namespace sees its own cgroup mounted at the root under the host's name for it.
    """
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    out: list[MemoryCgroup] = []
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            version, mount = 2, root
        elif "memory" in controllers.split(","):
            version, mount = 1, root / "memory"
        else:
            continue
        here = Path(os.path.normpath(mount / path.lstrip("/")))  # a namespaced process may see "/../.."
        chain = [here, *here.parents] if here.is_relative_to(mount) else [mount]
        out += [MemoryCgroup(p, version) for p in chain if p.is_relative_to(mount) and _has_memory(p, version)]
    return out


def _has_memory(path: Path, version: int) -> bool:
    """Whether `path` is a cgroup with the memory controller (in v2, the one it lists as enabled)."""
    if version == 1:
        return path.is_dir()
    try:  # also false for the tmpfs at the root of a v1 system that names a v2 path as well
        return "memory" in (path / "cgroup.controllers").read_text().split()
    except OSError:
        return False


def headroom(root: Path = ROOT, self_cgroup: Path = SELF) -> int | None:
    """Bytes this process's cgroups still allow it: the least limit less usage from its cgroup up to
    the mount root, or None where no limit applies (or none can be read)."""
    rooms = [(g.limit(), g.usage()) for g in memory_cgroups(root, self_cgroup)]
    rooms = [max(limit - usage, 0) for limit, usage in rooms if limit is not None and usage is not None]
    return min(rooms, default=None)


def capped_cgroup(name: str, limit_bytes: int, root: Path = ROOT, self_cgroup: Path = SELF) -> MemoryCgroup | None:
    """A new child `name` of this process's memory cgroup, limited to `limit_bytes`; None (the reason
    logged) where this process cannot create one. Remove it with `remove()` when done."""
    own = memory_cgroups(root, self_cgroup)
    if not own:
        log.info("no memory caps: no memory cgroup under %s for this process", root)
        return None
    parent = own[0]
    group = MemoryCgroup(parent.path / name, parent.version)
    try:
        group.path.mkdir()
        if parent.version == 2 and "memory" not in (group.path / "cgroup.controllers").read_text().split():
            # v2 enables a controller for children in the parent; the kernel refuses it while the
            # parent holds processes itself ("no internal processes"), as a session's cgroup does.
            _write(parent.path / "cgroup.subtree_control", "+memory")
        _write(group.path / ("memory.max" if parent.version == 2 else "memory.limit_in_bytes"), str(int(limit_bytes)))
    except OSError as e:
        log.info("no memory caps: cannot create a memory-limited cgroup in %s (%s)", parent.path,
                 e.strerror or e)
        if group.path.is_dir():
            group.remove()
        return None
    return group


def _write(path: Path, text: str) -> None:
    # "r+" creates nothing: in a directory that is not a cgroup fs the control file is missing.
    with path.open("r+") as f:
        f.write(text)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise RuntimeError("cannot tell the available memory: no /proc/meminfo and no psutil") from None
    return int(psutil.virtual_memory().available)


def available_memory() -> int:
    """Bytes this device can still give a process: MemAvailable, bounded by what the limits of this
    process's cgroup and its ancestors leave (`headroom`)."""
    available = _meminfo_available()
    room = headroom()
    return available if room is None else min(available, room)


def process_memory() -> dict[str, int]:
    """This process's resident bytes from /proc/self/status: VmRSS (now), VmHWM (peak), RssAnon."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out
