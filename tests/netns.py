"""Machines on a test internet: Linux network namespaces, each with its own network stack and address.

An :class:`Internet` is a bridge in a namespace of its own (the "internet", 203.0.113.0/24, TEST-NET-3,
which exists only inside the namespaces made here: nothing links them to this machine's network).
``internet.machine("A")`` adds a public machine on it; ``internet.home("H")`` adds a home: a router
namespace with a public address whose iptables MASQUERADE the home's LAN (192.168.N.0/24) and drop
every unsolicited inbound packet, and a machine behind it. ``machine.popen(argv)`` runs a process in
the machine's namespace. ``close()`` kills every process in every namespace made here and deletes
the namespaces (deleting a namespace deletes its veth ends), also after a failure; namespaces left
by a test run that died are deleted by the next one.

Needs root, ``ip`` (iproute2) and, for homes, ``iptables``; :func:`unavailable` says what is missing.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "lmoe"
PUBLIC = "203.0.113"  # TEST-NET-3 (RFC 5737): a documentation range, routed nowhere
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _netns_exec(ns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=30, check=True)


@functools.lru_cache(maxsize=None)
def unavailable(nat: bool = False) -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    if nat and shutil.which("iptables") is None:
        return "no `iptables` (apt-get install -y iptables)"
    name = f"{PREFIX}-{os.getpid()}-probe"
    if _ip("netns", "add", name, check=False).returncode != 0:
        return "cannot create a network namespace"
    _ip("netns", "del", name, check=False)
    return None


def remove_stale() -> None:
    """Delete namespaces (and kill their processes) left by test runs whose process is gone."""
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listing:
        name = line.split(" ")[0]
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its test run still lives
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_namespace(name)


def _kill_namespace(name: str) -> None:
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


class Machine:
    """A network namespace with one interface ``eth0`` at ``address``."""

    def __init__(self, internet: "Internet", name: str, ns: str, address: str):
        self.internet, self.name, self.ns, self.address = internet, name, ns, address
        self.router: Router | None = None

    @property
    def public_address(self) -> str:
        """The address the internet sees (its router's, behind NAT)."""
        return self.router.address if self.router is not None else self.address

    def popen(self, argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in this machine's namespace (in ``cwd``), its output to ``log``; :meth:`Internet.close` ends it."""
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        environment.pop("LIGHTNING_MOE_SECRET", None)
        handle = open(log, "wb")
        try:
            process = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=environment, cwd=cwd, start_new_session=True)
        finally:
            handle.close()
        self.internet.processes.append(process)
        return process

    def python(self, code: str, timeout: float = 60.0) -> str:
        """Run ``python -c code`` here and return its stdout (raises with its output if it fails)."""
        result = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code], capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"python in {self.name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def limit(self, mbit: float, burst_kb: int = 64) -> None:
        """Shape this machine's uplink with a token bucket (``tc tbf``) at ``mbit`` Mbit/s."""
        _netns_exec(self.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{mbit}mbit",
                    "burst", f"{burst_kb}kb", "latency", "50ms")


class Router:
    """A home router: ``wan`` on the internet at ``address``, ``lan`` to the home; MASQUERADE, no inbound."""

    def __init__(self, ns: str, address: str):
        self.ns, self.address = ns, address


class Internet:
    """A bridge in a namespace of its own, and the machines and home routers on it (see the module)."""

    def __init__(self) -> None:
        remove_stale()
        self.tag = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self._hosts = itertools.count(5)  # public addresses .5, .6, ... (homes' routers: .101, ...)
        self._taken: set[str] = set()
        self._homes = itertools.count(1)
        self._links = itertools.count()
        try:
            self.switch = self._namespace("net")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _plug(self, ns: str, address: str, ifname: str = "eth0") -> None:
        """A veth from ``ns`` (``ifname`` at ``address``/24) to the bridge."""
        port = f"p{next(self._links)}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", ifname)
        _ip("-n", ns, "link", "set", ifname, "up")

    def machine(self, name: str, address: str | None = None) -> Machine:
        """A machine with a public address (``203.0.113.N``; ``address`` picks N)."""
        if address is None:
            address = next(a for a in (f"{PUBLIC}.{n}" for n in self._hosts) if a not in self._taken)
        if address in self._taken:
            raise ValueError(f"{address} is taken on this internet")
        self._taken.add(address)
        ns = self._namespace(name)
        self._plug(ns, address)
        return Machine(self, name, ns, address)

    def home(self, name: str, symmetric: bool = False) -> Machine:
        """A machine behind a home router that masquerades its LAN and drops unsolicited inbound traffic.

        ``symmetric``: the router picks a random public port for every new connection (MASQUERADE
        ``--random-fully``), as a symmetric NAT does, instead of keeping the source port where it is free:
        the address a peer observed is not the one the next connection gets, so hole punching fails."""
        index = next(self._homes)
        router = Router(self._namespace(f"{name}r"), f"{PUBLIC}.{100 + index}")
        self._plug(router.ns, router.address, "wan")
        ns = self._namespace(name)
        lan, address = f"192.168.{index}.1", f"192.168.{index}.2"
        _ip("-n", router.ns, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", router.ns, "addr", "add", f"{lan}/24", "dev", "lan")
        _ip("-n", router.ns, "link", "set", "lan", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", lan)
        _netns_exec(router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"] + (["--random-fully"] if symmetric else [])
        for rule in (masquerade,
                     ["-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-A", "FORWARD", "-i", "wan", "-j", "DROP"],
                     ["-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-A", "INPUT", "-i", "wan", "-j", "DROP"]):
            _netns_exec(router.ns, "iptables", *rule)
        machine = Machine(self, name, ns, address)
        machine.router = router
        return machine

    def close(self) -> None:
        """End every process started here (SIGTERM, then SIGKILL) and delete every namespace."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)
        for ns in reversed(self.namespaces):
            _kill_namespace(ns)
        self.namespaces.clear()

    def __enter__(self) -> "Internet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float) -> str:
    """Wait (at most ``timeout`` s) until ``log`` has a line containing ``text``; return that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no line with {text!r} within {timeout} s (exit code {process.poll()}):\n"
                         f"{log.read_text(errors='replace')[-4000:]}")
