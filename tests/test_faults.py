"""Fault tests: the real sidecar (`python -m billing_core serve-webhooks` in a subprocess) under a crash,
a database held by another writer, and PostgreSQL connections dropped under it. After each fault the
events are delivered again, as Stripe retries them, and every balance must be exact, every event applied
once, and nothing half-applied at any point we can look.

The deliveries are bench/stripe_mix.py's realistic mix (new subscriptions, renewals, packs, event types
without a handler, redeliveries), so these tests and `bench/webhooks.py` check the same expectations.
"""
from __future__ import annotations

import sqlite3
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from billing_core import db
from billing_core.models import LedgerEntry, Payment, StripeEvent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from common import Server, free_port, sidecar_command, start_server  # noqa: E402
from stripe_mix import build_workload, ledger_mismatches, sidecar_environment, signed_deliveries  # noqa: E402

pytestmark = [pytest.mark.slow]
WEBHOOK_PATH = "/api/stripe/webhook"


# --- helpers -------------------------------------------------------------------------------------

def start_sidecar(database_url: str, log_path: Path) -> Server:
    port = free_port()
    return start_server(sidecar_command(port), env=sidecar_environment(database_url), port=port, log_path=log_path)


class Delivery:
    """Deliver signed events from a few threads in the background; statuses[i] is None until answered
    (and stays None when the connection broke)."""

    def __init__(self, base_url: str, deliveries: list[dict], *, workers: int = 6):
        self.signed = signed_deliveries(deliveries)
        self.statuses: list[int | None] = [None] * len(deliveries)
        self.answered = 0
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=base_url, timeout=httpx.Timeout(60, connect=5))
        self._pool = ThreadPoolExecutor(workers)
        self._futures = [self._pool.submit(self._send, i) for i in range(len(deliveries))]

    def _send(self, i: int) -> None:
        body, header = self.signed[i]
        try:
            response = self._client.post(WEBHOOK_PATH, content=body,
                                         headers={"Stripe-Signature": header, "Content-Type": "application/json"})
            self.statuses[i] = response.status_code
        except httpx.HTTPError:
            self.statuses[i] = None
        with self._lock:
            self.answered += 1

    def wait_for(self, answered: int, *, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.answered < answered:
            assert time.monotonic() < deadline, f"only {self.answered} deliveries answered"
            time.sleep(0.01)

    def finish(self) -> list[int | None]:
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()
        self._client.close()
        return self.statuses


def deliver(base_url: str, deliveries: list[dict], *, workers: int = 6) -> list[int | None]:
    return Delivery(base_url, deliveries, workers=workers).finish()


def half_applied(engine) -> list[str]:
    """Payments whose recorded grant differs from the ledger's grant entries for them: a payment and its
    grant are written in one transaction, so any difference is an event applied in part."""
    with db.read_session(engine) as session:
        granted = dict(session.execute(
            select(LedgerEntry.payment_id, func.sum(LedgerEntry.credits))
            .where(LedgerEntry.payment_id.is_not(None),
                   LedgerEntry.kind.in_(("subscription_grant", "upgrade_topup", "pack_grant")))
            .group_by(LedgerEntry.payment_id)).all())
        payments = session.execute(select(Payment.id, Payment.credits_granted)).all()
    problems = [f"payment {pid} says {credits} granted, ledger has {granted.get(pid, 0)}"
                for pid, credits in payments if credits != granted.get(pid, 0)]
    orphans = set(granted) - {pid for pid, _ in payments}
    return problems + [f"grants for unknown payment {pid}" for pid in sorted(orphans)]


def unapplied(engine, deliveries: list[dict], statuses: list[int | None]) -> list[str]:
    """Events answered 200 that are not stored as processed or ignored."""
    acknowledged = {evt["id"] for evt, status in zip(deliveries, statuses) if status == 200}
    with db.read_session(engine) as session:
        done = set(session.execute(select(StripeEvent.id).where(
            StripeEvent.id.in_(acknowledged), StripeEvent.status.in_(("processed", "ignored")))).scalars())
    return sorted(acknowledged - done)


def stored_statuses(engine) -> dict[str, int]:
    with db.read_session(engine) as session:
        return dict(session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status)).all())


def is_postgresql(url: str) -> bool:
    return url.startswith("postgresql")


def with_pg_options(url: str, *, extra_options: str = "", application_name: str | None = None) -> str:
    """The fixture's URL (search_path in `options`) with more server options / an application name."""
    if extra_options:
        url = url + quote(" " + extra_options)
    if application_name:
        url = url + f"&application_name={application_name}"
    return url


# --- SIGKILL in the middle of a stream -----------------------------------------------------------

@pytest.mark.timeout(90)
def test_sigkill_mid_stream_then_redelivery_applies_every_event_exactly_once(database_url, tmp_path):
    workload = build_workload(events=240, seed=11, prefix="kill")
    engine = db.get_engine(database_url)
    server = start_sidecar(database_url, tmp_path / "sidecar-1.log")
    try:
        delivery = Delivery(server.base_url, workload.deliveries)
        delivery.wait_for(len(workload.deliveries) // 3)
        server.kill()  # SIGKILL: no shutdown, transactions in flight are cut off
        first = delivery.finish()
    finally:
        server.kill()
    answered_ok = sum(status == 200 for status in first)
    assert 0 < answered_ok < len(first), "the kill must land in the middle of the stream"
    # Stripe never redelivers an event we answered 200: each of those must be stored and applied already
    assert unapplied(engine, workload.deliveries, first) == []
    assert half_applied(engine) == []
    assert ledger_mismatches(engine, workload) != []  # not everything arrived yet

    server = start_sidecar(database_url, tmp_path / "sidecar-2.log")
    try:
        second = deliver(server.base_url, workload.deliveries)  # Stripe retries; here: everything again
    finally:
        server.stop()
    assert set(second) == {200}
    assert half_applied(engine) == []
    assert ledger_mismatches(engine, workload) == []
    assert set(stored_statuses(engine)) <= {"processed", "ignored"}


# --- a long write transaction holding the database -----------------------------------------------

@pytest.mark.timeout(90)
def test_database_held_by_a_long_write_transaction_deliveries_wait_or_fail_whole(database_url, tmp_path):
    workload = build_workload(events=80, seed=12, prefix="held")
    engine = db.get_engine(database_url)
    sidecar_url = database_url
    if is_postgresql(database_url):  # a waiting PostgreSQL writer gives up after 1.5 s, so some get a 500
        sidecar_url = with_pg_options(database_url, extra_options="-clock_timeout=1500")
    server = start_sidecar(sidecar_url, tmp_path / "sidecar.log")
    try:
        if is_postgresql(database_url):
            holder_engine = create_engine(db.normalize_url(database_url), poolclass=NullPool)
            holder = holder_engine.connect()
            transaction = holder.begin()
            # no grant can be written while this is held; everything else can
            holder.execute(text("LOCK TABLE ledger_entry IN EXCLUSIVE MODE"))
        else:
            holder = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # the whole database's write lock
        delivery = Delivery(server.base_url, workload.deliveries, workers=4)
        time.sleep(4)
        answered_while_held = delivery.answered
        with db.read_session(engine) as session:
            payments_while_held = session.execute(select(func.count()).select_from(Payment)).scalar_one()
        if is_postgresql(database_url):
            transaction.rollback()
            holder.close()
        else:
            holder.execute("ROLLBACK")
            holder.close()
        statuses = delivery.finish()

        # Every payment comes with a grant in this mix, and no grant could be written: no payment may exist.
        assert payments_while_held == 0
        if is_postgresql(database_url):
            assert 500 in statuses  # gave up waiting: Stripe will retry
        else:
            assert answered_while_held == 0  # SQLite writers queue for the lock (busy timeout 30 s)
        assert set(statuses) <= {200, 500}
        assert unapplied(engine, workload.deliveries, statuses) == []
        assert half_applied(engine) == []

        retry = [workload.deliveries[i] for i, status in enumerate(statuses) if status != 200]
        assert set(deliver(server.base_url, retry)) <= {200}
    finally:
        server.stop()
    assert ledger_mismatches(engine, workload) == []
    assert half_applied(engine) == []


# --- PostgreSQL connections dropped under the sidecar ---------------------------------------------

@pytest.mark.timeout(90)
def test_postgresql_connections_dropped_the_sidecar_recovers_without_a_restart(database_url, tmp_path):
    if not is_postgresql(database_url):
        pytest.skip("PostgreSQL only: SQLite has no server connection to drop")
    workload = build_workload(events=120, seed=13, prefix="drop")
    half = len(workload.deliveries) // 2
    name = f"fault_{uuid.uuid4().hex[:10]}"
    engine = db.get_engine(database_url)
    server = start_sidecar(with_pg_options(database_url, application_name=name), tmp_path / "sidecar.log")
    try:
        assert set(deliver(server.base_url, workload.deliveries[:half])) == {200}
        assert unapplied(engine, workload.deliveries[:half], [200] * half) == []
        with engine.connect() as conn:
            dropped = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                        "WHERE application_name = :name"), {"name": name}).scalar_one()
        assert dropped >= 1
        health = httpx.get(server.base_url + "/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["database"] == "ok"
        assert set(deliver(server.base_url, workload.deliveries[half:])) == {200}
        assert server.process.poll() is None  # the same process, never restarted
    finally:
        server.stop()
    assert ledger_mismatches(engine, workload) == []
    assert half_applied(engine) == []


@pytest.mark.timeout(150)
def test_postgresql_connections_dropped_mid_transaction_fail_whole_and_redelivery_completes(database_url, tmp_path):
    """Connections killed while deliveries are in flight (inside their transactions): each delivery is applied
    whole or answered 5xx with nothing applied, and Stripe's redelivery then completes the ledger exactly."""
    if not is_postgresql(database_url):
        pytest.skip("PostgreSQL only: SQLite has no server connection to drop")
    workload = build_workload(events=120, seed=17, prefix="midrop")
    name = f"fault_{uuid.uuid4().hex[:10]}"
    engine = db.get_engine(database_url)
    server = start_sidecar(with_pg_options(database_url, application_name=name), tmp_path / "sidecar.log")
    stop, drops = threading.Event(), []

    def drop_busy_connections():
        killer = create_engine(db.normalize_url(database_url), poolclass=NullPool)
        try:
            while not stop.is_set():
                with killer.connect() as conn:
                    drops.append(conn.execute(text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :name AND state <> 'idle'"), {"name": name}).scalar_one())
                time.sleep(0.02)
        finally:
            killer.dispose()

    dropper = threading.Thread(target=drop_busy_connections)
    dropper.start()
    try:
        try:
            statuses = deliver(server.base_url, workload.deliveries)
        finally:
            stop.set()
            dropper.join(20)
        assert sum(drops) >= 1, "no connection was caught in flight"
        assert set(statuses) <= {200, 500}
        assert unapplied(engine, workload.deliveries, statuses) == []
        assert half_applied(engine) == []
        pending = [evt for evt, status in zip(workload.deliveries, statuses) if status != 200]
        for _ in range(3):  # Stripe redelivers what wasn't acknowledged
            if not pending:
                break
            pending = [evt for evt, status in zip(pending, deliver(server.base_url, pending)) if status != 200]
        assert pending == []
        assert server.process.poll() is None  # the same process, never restarted
    finally:
        server.stop()
    assert ledger_mismatches(engine, workload) == []
    assert half_applied(engine) == []
