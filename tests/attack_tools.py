"""Attacks on a real ExpertHost over 127.0.0.1, for test_host_attacks.py and benchmark_attacks.py.

The host runs in a process of its own (its RSS and open files are its own), each attacker in another
(up to ~16,000 sockets), the legitimate client in the caller. Attackers connect from 127.2.0.1,
127.3.0.1 and up (all of 127/8 is loopback), each address in a network of its own, or from the
``addresses`` they are given (:func:`sybil_addresses`), so the per-address and per-network limits
apply to them and not to the legitimate client on 127.0.0.1. Every loop is bounded by a count or a
deadline.

    python tests/attack_tools.py host '{"limits": {...}, "secret": null}'
    python tests/attack_tools.py attack '{"kind": "idle", "port": 1234, "count": 10000, ...}'
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HID = 64
UID = "ffn.0"
MAX_BATCH = 32
SLOWLORIS_HEAD = f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode()  # then a byte a second


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds that process ``pid`` has used (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(mode: str, config: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, __file__, mode, json.dumps(config)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"process {proc.pid} said nothing within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.pid} exited with {proc.wait()}")
    return line


def _end(proc: subprocess.Popen, timeout: float) -> str:
    """Close the process's stdin (its signal to stop), return what it printed last; kill it if it hangs."""
    try:
        out, _ = proc.communicate(input=None if proc.stdin.closed else "", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    lines = [line for line in (out or "").splitlines() if line.strip()]
    return lines[-1] if lines else "{}"


class HostProcess:
    """An ExpertHost with one ffn expert (hid 64, max batch ``max_batch``) in a child process; ``limits``: HostLimits
    keys."""

    def __init__(self, secret: str | None = None, max_batch: int = MAX_BATCH, **limits: Any):
        self.secret = secret
        self.proc = _spawn("host", {"limits": limits, "secret": secret, "max_batch": max_batch})
        try:
            info = json.loads(_read_line(self.proc, 120))
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.port, self.host_id, self.pid = info["port"], info["host_id"], self.proc.pid
        self.endpoint = f"127.0.0.1:{self.port}"

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self, timeout: float = 60) -> dict:
        """Shut the host down; returns its final http_stats()."""
        return json.loads(_end(self.proc, timeout))

    def __enter__(self) -> "HostProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()


class Attacker:
    """One attack in a child process; ``ready`` once its connections are up; ``stop`` returns its counters."""

    def __init__(self, kind: str, port: int, count: int, sources: int = 1, seconds: float = 60, **extra: Any):
        self.proc = _spawn("attack", {"kind": kind, "port": port, "count": count, "sources": sources,
                                      "seconds": seconds, **extra})

    def wait_ready(self, timeout: float = 60) -> dict:
        return json.loads(_read_line(self.proc, timeout))

    def stop(self, timeout: float = 60) -> dict:
        return json.loads(_end(self.proc, timeout))

    def __enter__(self) -> "Attacker":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()


class LegitClient:
    """A trainer's calls: forward requests of ``rows`` rows in a loop, each recorded as (ok, seconds).

    ``fresh``: each call on a new connection (a trainer arriving), else on kept-alive ones (public hosts only)."""

    def __init__(self, endpoint: str, secret: str | None = None, rows: int = 16, timeout: float = 10.0,
                 fresh: bool = False):
        import torch

        from lightning_moe import auth, wire

        self.endpoint, self.secret, self.timeout = endpoint, auth.resolve_secret(secret) if secret else None, timeout
        self.x = torch.randn(rows, HID)
        self.fresh, self.body = fresh, wire.serialize([self.x])
        if fresh and secret:
            raise ValueError("fresh connections are for public hosts")
        self.results: list[tuple[bool, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def call(self) -> tuple[bool, float]:
        from lightning_moe.client.remote_expert import RemoteExpertError, call_expert

        start = time.perf_counter()
        if self.fresh:
            return self._fresh_call(), time.perf_counter() - start
        try:
            call_expert(UID, self.endpoint, "forward", [self.x], timeout=self.timeout, secret=self.secret)
            ok = True
        except RemoteExpertError:
            ok = False
        return ok, time.perf_counter() - start

    def _fresh_call(self) -> bool:
        import http.client

        host, port = self.endpoint.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=self.timeout, source_address=("127.0.0.1", 0))
        try:
            connection.request("POST", f"/forward/{UID}", self.body, {"Content-Type": "application/octet-stream"})
            answer = connection.getresponse()
            answer.read()
            return answer.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def run(self, seconds: float, max_calls: int = 100_000, pause: float = 0.01) -> list[tuple[bool, float]]:
        """Calls in a loop for ``seconds``; returns the results of this run."""
        out: list[tuple[bool, float]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(out) < max_calls and not self._stop.is_set():
            out.append(self.call())
            time.sleep(pause)
        self.results.extend(out)
        return out


def summarize(results: list[tuple[bool, float]]) -> dict:
    """Success rate (%) and p50/p99 latency (ms) of successful calls."""
    if not results:
        return {"calls": 0, "success": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    latencies = sorted(t for ok, t in results if ok) or [float("nan")]
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return {"calls": len(results), "success": 100.0 * sum(ok for ok, _ in results) / len(results),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * p99}


# ---- child process: the host -------------------------------------------------------------------
def host_main(config: dict) -> None:
    import logging

    import torch

    from lightning_moe.config import HostConfig, HostLimits
    from lightning_moe.server import ExpertBackend, ExpertHost, make_expert

    logging.basicConfig(level=logging.WARNING)
    raise_open_files_limit()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    expert = make_expert("ffn", HID)
    backend = ExpertBackend(UID, expert, torch.optim.SGD(expert.parameters(), lr=0.01), [((HID,), torch.float32)],
                            max_batch_size=config.get("max_batch", MAX_BATCH))
    with ExpertHost([backend], HostConfig(limits=HostLimits(**config["limits"])), secret=config.get("secret")) as host:
        print(json.dumps({"port": host.port, "host_id": host.host_id}), flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        stats = host.http_stats()
    stats["errors_by_status"] = {str(k): v for k, v in stats["errors_by_status"].items()}
    print(json.dumps(stats), flush=True)


# ---- child process: an attacker ------------------------------------------------------------------
async def _status(reader: asyncio.StreamReader, timeout: float) -> str:
    """The status of the host's answer ("431", ...), "closed" if it closed without one, "timeout"."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        return "timeout"
    except (ConnectionError, OSError):
        return "reset"
    parts = line.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 and line.startswith(b"HTTP/1.") else "closed"


async def _read_answer(reader: asyncio.StreamReader, timeout: float) -> str:
    """Read a whole answer (headers and Content-Length body); returns its status."""
    status = await _status(reader, timeout)
    if not status.isdigit():
        return status
    length = 0
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await asyncio.wait_for(reader.readexactly(length), timeout)
    return status


class _Attack:
    def __init__(self, config: dict):
        self.config, self.kind, self.port = config, config["kind"], config["port"]
        first = config.get("first_source", 2)
        self.sources = config.get("addresses") or [f"127.{first + i}.0.1" for i in range(max(1, config.get("sources", 1)))]
        self.counts: collections.Counter = collections.Counter()
        self.stop = asyncio.Event()
        self.connect_slots = asyncio.Semaphore(256)
        self.open = 0
        self.rate = float(config.get("rate", 0)) or None  # bytes/s over all connections (None: as fast as the kernel takes)
        self._next_send = 0.0
        self.held: dict[int, tuple[socket.socket, asyncio.Future]] = {}  # idle and slowloris: open sockets by worker

    async def throttle(self, nbytes: int) -> None:
        """Wait so that all connections together send at most ``rate`` bytes per second."""
        if self.rate is None:
            return
        now = time.monotonic()
        self._next_send = max(now, self._next_send) + nbytes / self.rate
        if self._next_send - now > 0.001:
            await asyncio.sleep(self._next_send - now)

    async def connect(self, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self.connect_slots:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.sources[i % len(self.sources)], 0)), 10)
        self.counts["connections"] += 1
        return reader, writer

    async def worker(self, i: int) -> None:
        step = getattr(self, f"_{self.kind}")
        while not self.stop.is_set():
            writer = None
            try:
                reader, writer = await self.connect(i)
                self.open += 1
                try:
                    self.counts[await step(i, reader, writer)] += 1
                finally:
                    self.open -= 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                self.counts[type(e).__name__] += 1
                await asyncio.sleep(0.2)
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(0.05)

    async def _until_stop(self, awaitable: Any, timeout: float) -> Any:
        """``awaitable``'s result, or None if the attack stops (or ``timeout`` passes) first."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({task, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error, if it ends in one, is not news
        return None

    async def held_worker(self, i: int) -> None:
        """idle and slowloris: one raw socket held open, opened again whenever the host closes it.

        These attacks run on raw sockets, without a task or stream per connection: on this shared
        machine the attacker's own CPU is taken from the host, and on the internet it would not be.
        """
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.bind((self.sources[i % len(self.sources)], 0))
                async with self.connect_slots:
                    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), 10)
                self.counts["connections"] += 1
                ended: asyncio.Future = loop.create_future()
                loop.add_reader(sock.fileno(), self._host_spoke, sock, ended)
                if self.kind == "slowloris":
                    sock.send(SLOWLORIS_HEAD)
                self.held[i] = (sock, ended)
                self.open += 1
                try:
                    self.counts[await ended] += 1
                finally:
                    self.open -= 1
                    self.held.pop(i, None)
                    loop.remove_reader(sock.fileno())
            except (OSError, asyncio.TimeoutError) as e:
                self.counts[type(e).__name__] += 1
                await asyncio.sleep(0.2)
            finally:
                sock.close()
            await asyncio.sleep(0.05)

    @staticmethod
    def _host_spoke(sock: socket.socket, ended: asyncio.Future) -> None:
        try:
            data = sock.recv(200)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not ended.done():
            ended.set_result("answered" if data else "closed_by_host")

    async def trickle(self) -> None:
        """slowloris: every held socket sends one more header byte per second, a tenth of them every 0.1 s."""
        for tick in range(int(10 * (self.config["seconds"] + 60))):
            if self.stop.is_set():
                return
            await asyncio.sleep(0.1)
            for i, (sock, _) in list(self.held.items()):
                if i % 10 == tick % 10:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass  # the reader callback reports the closed connection

    async def _headers(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        line = b"X-Flood: " + b"a" * 1000 + b"\r\n"
        writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\n" + line)  # (a smaller first piece is a trickle: unread)
        for _ in range(self.config.get("lines", 200) - 1):  # up to 200 KB of headers per connection
            await self.throttle(len(line))
            writer.write(line)
            await writer.drain()
        writer.write(b"\r\n")
        return await _status(reader, 10)

    async def _bigbody(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        length = self.config.get("length", 60 << 20)
        head = f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
        if self.config.get("fake_signature"):  # well-formed, fresh, for this host: only the HMAC over the body can tell
            head += f"X-Timestamp: {time.time():.3f}\r\nX-Nonce: {i}\r\nX-Host-Id: {self.config['host_id']}\r\n" \
                    f"X-Signature: {os.urandom(32).hex()}\r\n"
        prefix = self.config.get("prefix", b"")  # e.g. a valid wire header, so that the host reads the whole body
        writer.write(head.encode() + b"\r\n" + prefix)
        return await self._send_zeros(reader, writer, length - len(prefix))

    async def _send_zeros(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int) -> str:
        answer = asyncio.ensure_future(_status(reader, 60))
        chunk, sent = bytes(1 << 16), 0
        while sent < length and not answer.done() and not self.stop.is_set():
            await self.throttle(len(chunk))
            if answer.done():
                break
            writer.write(chunk[: length - sent])
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, OSError, asyncio.TimeoutError):
                break
        self.counts["bytes_sent"] += sent
        if self.stop.is_set():
            answer.cancel()
            return "held"
        return await answer

    async def _rows(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        head = self.config["wire_head"]
        length = self.config["wire_total"]
        writer.write(f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + head)
        return await self._send_zeros(reader, writer, length - len(head))

    async def _truncated(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """A valid wire header, then the whole body but its last byte, then close."""
        head, length = self.config["wire_head"], self.config["wire_total"]
        writer.write(f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + head)
        chunk, left = bytes(1 << 16), length - len(head) - 1
        while left > 0 and not self.stop.is_set():
            await self.throttle(min(left, len(chunk)))
            writer.write(chunk[:left])
            left -= len(chunk)
            await asyncio.wait_for(writer.drain(), 10)
        self.counts["bytes_sent"] += length - len(head) - 1 - max(left, 0)
        await asyncio.sleep(0.2)  # the host has read it all and waits for the last byte
        return "truncated"

    async def _compute(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Valid forwards of the most rows the host takes, back to back on one connection, each asking to be kept."""
        head, length = self.config["wire_head"], self.config["wire_total"]
        zeros = bytes(length - len(head))  # zeros are valid float32 inputs
        for _ in range(100_000):
            if self.stop.is_set():
                return "done"
            path = f"/forward/{UID}?keep={os.urandom(8).hex()}"
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + head)
            writer.write(zeros)
            await asyncio.wait_for(writer.drain(), 60)
            status = await self._until_stop(_read_answer(reader, 60), 61)
            if status is None:
                return "held"
            self.counts[f"answers_{status}"] += 1
        return "done"

    async def _abort_answer(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """A valid forward with a large answer; close once its status line arrives, the rest unread."""
        head, length = self.config["wire_head"], self.config["wire_total"]
        writer.write(f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + head)
        writer.write(bytes(length - len(head)))
        await asyncio.wait_for(writer.drain(), 60)
        status = await _status(reader, 60)
        writer.transport.abort()
        return f"aborted_{status}"

    async def _replay(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        raw = self.config["captured"]
        status = "closed"
        for _ in range(1000):  # the captured request, again and again on one keep-alive connection
            if self.stop.is_set():
                break
            writer.write(raw)
            status = await _read_answer(reader, 10)
            if status != "401":
                return status
            self.counts["401"] += 1
        return "done"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(sys.stdin.fileno(), self.stop.set)  # the parent closing our stdin stops the attack
        count = self.config["count"]
        held = self.kind in ("idle", "slowloris")
        workers = [asyncio.create_task(self.held_worker(i) if held else self.worker(i)) for i in range(count)]
        if self.kind == "slowloris":
            workers.append(asyncio.create_task(self.trickle()))
        started = time.monotonic()
        ready_open = self.config.get("ready_open", 0.95 * count)  # fewer when the host's limits cap the attack
        while self.open < ready_open and time.monotonic() - started < 30 and not self.stop.is_set():
            if self.kind not in ("idle", "slowloris") and self.counts["connections"] >= count:
                break
            await asyncio.sleep(0.1)
        print(json.dumps({"ready": True, "open": self.open, "after_s": round(time.monotonic() - started, 2)}), flush=True)
        await self._until_stop(asyncio.sleep(self.config["seconds"]), self.config["seconds"] + 1)
        self.stop.set()
        for _, ended in list(self.held.values()):
            if not ended.done():
                ended.set_result("held")
        await asyncio.wait(workers, timeout=3)
        for worker in workers:
            worker.cancel()
        self.counts["open_at_end"] = self.open


def attack_main(config: dict) -> None:
    raise_open_files_limit()
    for key in ("prefix", "wire_head", "captured"):
        if key in config:
            config[key] = bytes.fromhex(config[key])
    attack = _Attack(config)
    asyncio.run(attack.run())
    print(json.dumps(dict(attack.counts)), flush=True)


if __name__ == "__main__":
    mode, raw = sys.argv[1], json.loads(sys.argv[2])
    host_main(raw) if mode == "host" else attack_main(raw)


# ---- what some attacks send -------------------------------------------------------------------
def sybil_addresses(count: int, layout: str) -> list[str]:
    """``count`` attacking addresses: ``"one24"``, all in 127.77.0.0/24; ``"own16"``, each in a /16 of its own
    (127.100.0.1, 127.101.0.1, ...). Neither touches 127.0.0.0/24, the legitimate client's network."""
    if layout == "one24":
        return [f"127.77.0.{2 + i}" for i in range(count)]
    return [f"127.{100 + i}.0.1" for i in range(count)]


def huge_rows_request(rows: int, width: int = HID) -> dict:
    """Attack options for a forward whose wire header claims ``rows`` rows of ``width`` float32 (the expert takes
    ``HID``; more is refused once the body is read): the header bytes and the message size."""
    import struct

    from lightning_moe import wire

    nbytes = rows * width * 4
    header = json.dumps({"tensors": [{"dtype": "float32", "shape": [rows, width], "compression": "none", "nbytes": nbytes}]},
                        separators=(",", ":")).encode()
    header += b" " * (-(wire.PREFIX_BYTES + len(header)) % 8)
    head = struct.pack("<4sI", wire.MAGIC, len(header)) + header
    return {"wire_head": head.hex(), "wire_total": len(head) + nbytes}


def captured_request(secret: str, host_id: str, rows: int = 16) -> dict:
    """Attack options replaying a correctly signed forward request, signed for the host instance ``host_id``."""
    import torch

    from lightning_moe import auth, wire

    body = wire.serialize([torch.randn(rows, HID)])
    path = f"/forward/{UID}"
    headers = auth.request_headers(secret.encode(), "POST", path, body, "none", host_id)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nX-Compression: none\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return {"captured": (head.encode() + b"\r\n" + body).hex()}
