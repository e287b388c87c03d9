"""Two sidecar processes of `serve-webhooks --workers 2` on one PostgreSQL database, as behind a load balancer.

Every event goes to both processes at the same moment (so its copies race in different workers), spends
for one account arrive through both, and one worker is SIGKILLed mid-stream. Afterwards, as Stripe and the
DevOps Agent would, whatever got no answer is sent again; then every balance must be exact, every spend
counted once, and nothing but the killed worker's dropped connections may have failed (no 5xx at all).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from billing_core import db, ledger
from billing_core.models import LedgerEntry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from common import (Server, free_port, process_cpu_seconds, sidecar_command, start_server,  # noqa: E402
                    wait_for_workers, worker_pids)
from stripe_mix import (API_TOKEN, build_workload, ledger_mismatches, sidecar_environment,  # noqa: E402
                        signed_deliveries)

pytestmark = [pytest.mark.slow]
WEBHOOK_PATH = "/api/stripe/webhook"
SPENDER = "workers-spender"
STARTING_CREDITS = 300
SPEND = 7
SPENDS = 60  # 420 credits asked for, 300 there: some are refused with 402
STARTUP_TIMEOUT = 90  # six Python processes importing at once take 30 s and more on a busy 2-core machine


def start_sidecar(database_url: str, log_path: Path, *, workers: int) -> Server:
    port = free_port()
    server = start_server(sidecar_command(port, workers=workers), env=sidecar_environment(database_url),
                          port=port, log_path=log_path, timeout=STARTUP_TIMEOUT)
    wait_for_workers(server.process.pid, workers, timeout=STARTUP_TIMEOUT)
    return server


def fresh_client(base_url: str) -> httpx.Client:
    """No keep-alive: every request is a new connection, so the kernel spreads them over the workers."""
    return httpx.Client(base_url=base_url, timeout=httpx.Timeout(60, connect=5),
                        limits=httpx.Limits(max_keepalive_connections=0))


class Sender:
    """Requests from a few threads; answers[i] is (server index, status) per attempt, status None when the
    connection broke."""

    def __init__(self, clients: list[httpx.Client], threads: int = 8):
        self.clients = clients
        self.pool = ThreadPoolExecutor(threads)
        self.lock = threading.Lock()
        self.answered = 0

    def send(self, server: int, method: str, path: str, **kwargs) -> tuple[int, int | None, httpx.Response | None]:
        try:
            response = self.clients[server].request(method, path, **kwargs)
        except httpx.HTTPError:
            response = None
        with self.lock:
            self.answered += 1
        return server, (response.status_code if response is not None else None), response


def wait_until_busy(pid: int, *, timeout: float = 3) -> None:
    """Until the process is seen using CPU (so most likely in the middle of a request), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    before = process_cpu_seconds(pid)
    while time.monotonic() < deadline and process_cpu_seconds(pid) == before:
        time.sleep(0.002)


def webhook_kwargs(body: bytes, header: str) -> dict:
    return {"content": body, "headers": {"Stripe-Signature": header, "Content-Type": "application/json"}}


def spend_kwargs(reference: str) -> dict:
    return {"json": {"credits": SPEND, "reference": reference}, "headers": {"Authorization": f"Bearer {API_TOKEN}"}}


def give_credits(engine) -> None:
    with db.write_session(engine) as session:
        ledger.adjust(session, user_id=SPENDER, credits=STARTING_CREDITS, reason="workers test", operator="test")


def spent_entries(engine) -> tuple[int, int]:
    with db.read_session(engine) as session:
        count, total = session.execute(select(func.count(), func.coalesce(func.sum(LedgerEntry.credits), 0)).where(
            LedgerEntry.user_id == SPENDER, LedgerEntry.credits < 0)).one()
        return count, -total


@pytest.mark.timeout(240)
def test_two_processes_of_two_workers_stay_exact_with_duplicates_spends_and_a_killed_worker(database_url, tmp_path):
    if not database_url.startswith("postgresql"):
        pytest.skip("several workers need PostgreSQL (serve-webhooks refuses --workers on SQLite)")
    engine = db.get_engine(database_url)
    workload = build_workload(events=100, seed=31, prefix="workers")
    signed = signed_deliveries(workload.deliveries)
    give_credits(engine)
    with ThreadPoolExecutor(2) as starting:  # both at once: starting is most of this test's time
        servers = list(starting.map(lambda i: start_sidecar(database_url, tmp_path / f"sidecar-{i}.log", workers=2),
                                    range(2)))
    clients = [fresh_client(s.base_url) for s in servers]
    try:
        workers = {i: worker_pids(s.process.pid) for i, s in enumerate(servers)}
        cpu_before = {pid: process_cpu_seconds(pid) for pids in workers.values() for pid in pids}
        sender = Sender(clients)
        # every event to both processes at once; spends interleaved, alternating between the processes
        hook_futures, spend_futures = [], []
        spends_at = {round(i * len(signed) / SPENDS): i for i in range(SPENDS)}
        for i, (body, header) in enumerate(signed):
            for server in (0, 1):
                hook_futures.append((i, sender.pool.submit(sender.send, server, "POST", WEBHOOK_PATH,
                                                           **webhook_kwargs(body, header))))
            if i in spends_at:
                n = spends_at[i]
                spend_futures.append((n, sender.pool.submit(sender.send, n % 2, "POST",
                                                            f"/api/accounts/{SPENDER}/consume",
                                                            **spend_kwargs(f"job-{n}"))))
        total = len(hook_futures) + len(spend_futures)
        deadline = time.monotonic() + 60
        while sender.answered < total // 3:
            assert time.monotonic() < deadline, f"only {sender.answered} of {total} answered"
            time.sleep(0.01)
        killed = workers[0][0]
        wait_until_busy(killed)
        os.kill(killed, signal.SIGKILL)  # mid-stream: its requests and transactions in flight are cut off

        hook_answers = [(i, *f.result(timeout=90)[:2]) for i, f in hook_futures]
        spend_answers = {n: f.result(timeout=90) for n, f in spend_futures}
        sender.pool.shutdown()

        # no 5xx anywhere; a broken connection only from the process whose worker was killed
        statuses = [status for _, _, status in hook_answers] + [a[1] for a in spend_answers.values()]
        assert not [s for s in statuses if s is not None and s >= 500], statuses
        assert {s for _, _, s in hook_answers} <= {200, None}
        assert {a[1] for a in spend_answers.values()} <= {200, 402, None}
        broken = [(server, i) for i, server, status in hook_answers if status is None]
        broken += [(a[0], n) for n, a in spend_answers.items() if a[1] is None]
        assert {server for server, _ in broken} <= {0}, broken
        served = {pid: process_cpu_seconds(pid) - cpu_before[pid] for pids in workers.values() for pid in pids
                  if pid != killed}
        assert all(cpu > 0 for cpu in served.values()), served  # every surviving worker took requests

        # Stripe redelivers what got no 200; the agent retries a spend with its reference
        acknowledged = {i for i, _, status in hook_answers if status == 200}
        for i, (body, header) in enumerate(signed):
            if i not in acknowledged:
                assert clients[1].post(WEBHOOK_PATH, **webhook_kwargs(body, header)).status_code == 200
        final = {}
        for n, (_, status, response) in spend_answers.items():
            if status is None:
                response = clients[1].post(f"/api/accounts/{SPENDER}/consume", **spend_kwargs(f"job-{n}"))
                assert response.status_code in (200, 402)
            final[n] = response
        # the same spends once more, each through the other process: nothing more is spent
        with ThreadPoolExecutor(8) as pool:
            again = dict(zip(final, pool.map(
                lambda n: clients[(n + 1) % 2].post(f"/api/accounts/{SPENDER}/consume", **spend_kwargs(f"job-{n}")),
                list(final))))
        for n, response in final.items():
            if response.status_code == 200:
                assert again[n].status_code == 200 and again[n].headers["idempotent-replayed"] == "true"
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()

    assert ledger_mismatches(engine, workload) == []
    paid = [n for n, response in final.items() if response.status_code == 200]
    assert len(paid) == STARTING_CREDITS // SPEND  # 42 spends fit; the rest were refused, none overspent
    assert spent_entries(engine) == (len(paid), SPEND * len(paid))
    with db.read_session(engine) as session:
        assert ledger.balance(session, SPENDER) == STARTING_CREDITS - SPEND * len(paid)
