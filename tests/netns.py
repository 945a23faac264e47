"""Two simulated cluster nodes on one machine: two network namespaces joined by a veth pair (tests/test_two_nodes.py).

Each namespace has its own network stack (interfaces, addresses, ports) and shares everything else with the host —
the filesystem included, which is what a cluster's shared output folder needs. The veth ends are created directly
inside the namespaces, so nothing (no interface, no address) ever appears in the host's namespace, and two runs at
the same time cannot collide: the namespace names carry the owner's pid and a random suffix, and each namespace has
its own port space (both runs may use 10.77.0.1 and the same port).

Cleanup: :func:`two_namespaces` deletes its namespaces in a ``finally`` (the veth pair goes with them); a run that
was killed before it could (SIGKILL, a CI timeout) leaves namespaces whose owner pid is dead, and the next run
removes those by name prefix (:func:`remove_stale`). A namespace whose owner is still alive is never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "fastinpo-2n-"
# the veth end inside each namespace: the same name on both "nodes", like eth0 on a real cluster (15 chars max)
IFNAME = "fi2n0"
ADDRESSES = ("10.77.0.1", "10.77.0.2")


@dataclass(frozen=True)
class Nodes:
    names: tuple[str, str]
    ifname: str = IFNAME
    addresses: tuple[str, str] = ADDRESSES

    def exec_prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program on ``node`` (0 or 1)."""
        return ["ip", "netns", "exec", self.names[node]]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed (rc {done.returncode}): {done.stderr.strip()}")
    return done


def cannot_create_reason() -> str | None:
    """Why network namespaces cannot be created here (None: they can). Tries a real one: being root is not
    enough in a container without CAP_SYS_ADMIN."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on PATH"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    probe = f"{PREFIX}{os.getpid()}-probe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name[len(PREFIX):].split("-")[0])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    # lines are "NAME" or "NAME (id: N)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs that died without cleaning up (owner pid no longer alive)."""
    removed = []
    for name in _list():
        if name.startswith(PREFIX) and not _owner_alive(name):
            _delete(name)
            removed.append(name)
    return removed


def _delete(name: str) -> None:
    # processes still inside (a worker of a failed test, started by this test run) would keep the namespace alive
    # under no name: end them, by pid, first
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def two_namespaces() -> Iterator[Nodes]:
    """Two namespaces, ``lo`` up in each, joined by a veth pair: node 0 = 10.77.0.1/24, node 1 = 10.77.0.2/24 on
    interface ``fi2n0``. Deleted on exit, whatever happened."""
    remove_stale()
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    nodes = Nodes(names=(f"{tag}-0", f"{tag}-1"))
    try:
        for name in nodes.names:
            _ip("netns", "add", name)
        _ip("link", "add", IFNAME, "netns", nodes.names[0], "type", "veth", "peer", "name", IFNAME, "netns",
            nodes.names[1])
        for name, address in zip(nodes.names, nodes.addresses, strict=True):
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
            _ip("-n", name, "link", "set", IFNAME, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield nodes
    finally:
        for name in nodes.names:
            _delete(name)


def exists(name: str) -> bool:
    return name in _list()
