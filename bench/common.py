"""What the benchmarks share: servers in subprocesses, databases to run on, a keep-alive HTTP load generator.

The load generator speaks HTTP/1.1 over raw asyncio streams (one keep-alive connection per caller),
so the client costs as little CPU as possible on a machine it shares with the server under test.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit(figure: dict) -> None:
    """One JSON line per figure on stdout."""
    sys.stdout.write(json.dumps(figure, sort_keys=False) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


# --- databases ---------------------------------------------------------------------------------

@contextmanager
def sqlite_database(directory: Path, name: str = "billing.db") -> Iterator[str]:
    from billing_core import db

    url = f"sqlite:///{directory / name}"
    db.migrate(url)
    db.dispose_engines()
    yield url


@contextmanager
def postgresql_database(base_url: str) -> Iterator[str]:
    """A fresh schema on the PostgreSQL server, migrated; dropped afterwards."""
    from sqlalchemy import create_engine, text

    from billing_core import db

    schema = f"bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(db.normalize_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    base = db.normalize_url(base_url)
    url = f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"
    try:
        db.migrate(url)
        db.dispose_engines()
        yield url
    finally:
        db.dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def database(kind: str, directory: Path, *, url: str | None = None) -> Iterator[str]:
    if kind == "sqlite":
        with sqlite_database(directory) as found:
            yield found
    else:
        with postgresql_database(url or os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG_URL) as found:
            yield found


# --- servers -----------------------------------------------------------------------------------

@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far (Linux /proc)."""
        return process_cpu_seconds(self.process.pid)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_healthy(base_url: str, process: subprocess.Popen, log_path: Path, *, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server at {base_url} not healthy after {timeout}s: {log_path.read_text()[-2000:]}")


def start_server(command: list[str], *, env: dict[str, str], port: int, log_path: Path,
                 timeout: float = 30) -> Server:
    log = open(log_path, "ab")
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    log.close()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process, log_path, timeout=timeout)
    except Exception:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return Server(process, base_url, log_path)


def sidecar_command(port: int, *, workers: int = 1) -> list[str]:
    command = [PYTHON, "-m", "billing_core", "serve-webhooks", "--host", "127.0.0.1", "--port", str(port)]
    return command + (["--workers", str(workers)] if workers > 1 else [])


# --- worker processes (serve-webhooks --workers N: a uvicorn master and N spawned workers) --------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def worker_pids(master_pid: int) -> list[int]:
    """The uvicorn workers of a master: its children started by multiprocessing's spawn (not its
    resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or fields[1] != str(master_pid):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def process_cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_workers(master_pid: int, count: int, *, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(master_pid)
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise RuntimeError(f"uvicorn master {master_pid} has {len(worker_pids(master_pid))} of {count} workers")


@contextmanager
def running(command: list[str], *, env: dict[str, str], log_path: Path, port: int) -> Iterator[Server]:
    server = start_server(command, env=env, port=port, log_path=log_path)
    try:
        yield server
    finally:
        server.stop()


# --- load --------------------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadResult:
    statuses: list[int]
    latencies: list[float]  # seconds, per request, in the order they were sent
    elapsed: float
    bodies: list[bytes]
    client_cpu: float = 0.0  # seconds of CPU the load generator itself used
    server_cpu: float = 0.0  # seconds of CPU the server process used during the run

    @property
    def rate(self) -> float:
        return len(self.statuses) / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
        return round(ordered[index] * 1000, 2)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for status in self.statuses:
            counts[str(status)] = counts.get(str(status), 0) + 1
        return counts


def _encode(request: Request, host: str) -> bytes:
    lines = [f"{request.method} {request.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(request.body)}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def _run(base_url: str, requests: list[Request], concurrency: int) -> LoadResult:
    host_port = base_url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    statuses = [0] * len(requests)
    latencies = [0.0] * len(requests)
    bodies = [b""] * len(requests)
    payloads = [_encode(r, host_port) for r in requests]
    next_index = iter(range(len(requests)))

    async def caller():
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in next_index:
                started = time.perf_counter()
                for attempt in range(2):
                    try:
                        writer.write(payloads[i])
                        await writer.drain()
                        status, body, close = await _read_response(reader)
                        break
                    except (ConnectionError, asyncio.IncompleteReadError):
                        if attempt:
                            raise
                        writer.close()
                        reader, writer = await asyncio.open_connection(host, int(port))
                latencies[i] = time.perf_counter() - started
                statuses[i], bodies[i] = status, body
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
        finally:
            writer.close()

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return LoadResult(statuses, latencies, time.perf_counter() - started, bodies,
                      client_cpu=time.process_time() - cpu_started)


def run_load(base_url: str, requests: list[Request], *, concurrency: int = 16,
             server: Server | None = None) -> LoadResult:
    """Send every request over `concurrency` keep-alive connections, each taking the next unsent request.
    With `server`, also measure the CPU time it spent (`server_cpu`)."""
    cpu_before = server.cpu_seconds() if server else 0.0
    result = asyncio.run(_run(base_url, requests, concurrency))
    result.server_cpu = server.cpu_seconds() - cpu_before if server else 0.0
    return result
