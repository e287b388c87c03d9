"""Group commit on SQLite, through the real app and real signed deliveries (httpx over ASGI, the app's lifespan
run): events queued while the writer is busy are applied in one transaction and answered after its commit; one
that can't join a group is applied alone as before and the others still apply once; the writer outlives its own
errors and finishes its queue when stopped.

To make a group on purpose, a test holds SQLite's write lock (`db.write_connection`, as any other writer of the
process would) while the writer takes a first event, queues the events of the group behind it, then lets go."""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event as sa_event, func, select

from billing_core import db, events, handlers, ledger, ledger_check
from billing_core.group_commit import GroupWriter
from billing_core.models import LedgerEntry, Payment
from billing_core.webapp import WEBHOOK_PATH, create_app
from stripe_events import (DEFAULT_PRICES, balance, checkout_completed, configure_webhooks, encode, event, signed_headers,
                           stored, subscription_invoice)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from stripe_mix import (WEBHOOK_SECRET as BENCH_SECRET, build_workload, ledger_mismatches,  # noqa: E402
                        sidecar_environment)

NOW = int(time.time())
WAIT_LIMIT = 60  # seconds a test waits for the writer to reach a state before it fails (never a measure)


@asynccontextmanager
async def running_sidecar():
    """The sidecar app with its lifespan, an async client on it, and its group writer."""
    app = create_app()
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as client:
            yield client, app.state.webhook_writer


async def post(client: httpx.AsyncClient, evt: dict, *, secret: str | None = None) -> httpx.Response:
    body = encode(evt)
    headers = signed_headers(body, secret) if secret else signed_headers(body)
    return await client.post(WEBHOOK_PATH, content=body.encode("utf-8"), headers=headers)


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        assert time.monotonic() < deadline, f"the writer never got to: {what}"
        await asyncio.sleep(0.001)


async def as_one_group(client, writer: GroupWriter, evts: list[dict], *, secret: str | None = None,
                       first: dict | None = None) -> tuple[httpx.Response, list[httpx.Response]]:
    """Deliver `first` (a pack purchase by default) and, while the writer is held up applying it, `evts` at once:
    they queue and are taken as one group. Returns the answers to `first` and to each of `evts`."""
    first = first or checkout_completed(user_id="u_first", item="pack_100")
    taken = writer.status()["taken"]
    with db.write_connection(db.get_engine()):  # the writer waits for SQLite's write lock while we hold it
        leading = asyncio.create_task(post(client, first, secret=secret))
        await until(lambda: writer.status()["taken"] == taken + 1, "take the first event")
        rest = [asyncio.create_task(post(client, evt, secret=secret)) for evt in evts]
        await until(lambda: writer.status()["queued"] == len(evts), "queue the group")
    return await leading, list(await asyncio.gather(*rest))


@contextmanager
def writer_commits():
    """The COMMITs made on the group writer's thread."""
    seen = []

    def record(_connection):
        if threading.current_thread().name == "webhook-group-writer":
            seen.append("COMMIT")

    engine = db.get_engine()
    sa_event.listen(engine, "commit", record)
    try:
        yield seen
    finally:
        sa_event.remove(engine, "commit", record)


def answers(responses: list[httpx.Response]) -> list[tuple]:
    return [(r.status_code, r.json()["status"], r.json()["duplicate"]) for r in responses]


def entries(user_id: str) -> int:
    with db.read_session() as session:
        return session.execute(select(func.count()).select_from(LedgerEntry)
                               .where(LedgerEntry.user_id == user_id)).scalar_one()


def ledger_is_clean() -> bool:
    with db.read_session() as session:
        return ledger_check.check_ledger(session).ok


def paid_invoice(event_type: str, *, user_id: str | None = "u_inv", customer: str = "cus_inv",
                 invoice_id: str = "in_group1") -> dict:
    obj = subscription_invoice(invoice_id=invoice_id, customer=customer, subscription_id=f"sub_{invoice_id}",
                               user_id=user_id, price=DEFAULT_PRICES["starter"], period_start=NOW - 86400,
                               period_end=NOW + 29 * 86400, amount=999, billing_reason="subscription_create",
                               created=NOW - 86400)
    return event(event_type, obj, created=NOW - 86000)


@pytest.fixture
def webhooks(sqlite_url, monkeypatch):
    configure_webhooks(monkeypatch)
    return sqlite_url


def test_events_queued_together_commit_once_and_a_copy_inside_the_group_is_a_duplicate(webhooks):
    a, b, c = (checkout_completed(user_id=f"u_{n}", item=item) for n, item in
               (("a", "pack_100"), ("b", "pack_250"), ("c", "pack_500")))

    async def scenario():
        async with running_sidecar() as (client, writer):
            with writer_commits() as commits:
                first, group = await as_one_group(client, writer, [a, b, a, c])
            return first, group, commits

    first, group, commits = asyncio.run(scenario())
    assert first.status_code == 200
    assert answers(group) == [(200, "processed", False), (200, "processed", False), (200, "processed", True),
                              (200, "processed", False)]
    assert len(commits) == 2  # the first event alone, then the four together
    assert (balance("u_a"), balance("u_b"), balance("u_c")) == (100, 250, 500)
    assert [entries(user) for user in ("u_a", "u_b", "u_c")] == [1, 1, 1]
    assert stored(a["id"]).attempts == 1 and ledger_is_clean()


def test_a_second_event_type_for_an_invoice_sees_the_first_in_the_same_group(webhooks, monkeypatch):
    handled = []
    real_handle = handlers.handle

    def recording(session, ctx):
        handled.append(ctx.id)
        return real_handle(session, ctx)

    monkeypatch.setattr(handlers, "handle", recording)
    succeeded, paid = paid_invoice("invoice.payment_succeeded"), paid_invoice("invoice.paid")

    async def scenario():
        async with running_sidecar() as (client, writer):
            with writer_commits() as commits:
                _, group = await as_one_group(client, writer, [succeeded, paid])
            return group, commits

    group, commits = asyncio.run(scenario())
    assert answers(group) == [(200, "processed", False), (200, "processed", False)]
    assert len(commits) == 2
    assert paid["id"] not in handled  # marked done from what `succeeded` wrote, earlier in the same transaction
    row = stored(paid["id"])
    assert (row.status, row.user_id, row.attempts) == ("processed", "u_inv", 1)
    assert balance("u_inv") == 100 and entries("u_inv") == 1


def test_an_event_that_needs_attention_is_applied_alone_and_the_others_around_it_still_group(webhooks):
    packs = [checkout_completed(user_id=f"u_{n}", item="pack_100") for n in range(4)]
    nobody_s = paid_invoice("invoice.paid", user_id=None, customer="cus_nobody", invoice_id="in_nobody")

    async def scenario():
        async with running_sidecar() as (client, writer):
            with writer_commits() as commits:
                _, group = await as_one_group(client, writer, [packs[0], packs[1], nobody_s, packs[2], packs[3]])
            return group, commits

    group, commits = asyncio.run(scenario())
    assert answers(group) == [(200, "processed", False)] * 2 + [(200, "needs_attention", False)] + \
        [(200, "processed", False)] * 2
    # the first event; the two before the invoice together; the invoice kept as needs_attention; the two after it
    assert len(commits) == 4
    row = stored(nobody_s["id"])
    assert (row.status, row.attempts) == ("needs_attention", 1) and "can't tell which user" in row.error
    assert [balance(f"u_{n}") for n in range(4)] == [100] * 4 and [entries(f"u_{n}") for n in range(4)] == [1] * 4
    with db.read_session() as session:
        assert session.execute(select(func.count()).select_from(Payment)
                               .where(Payment.invoice_id == "in_nobody")).scalar_one() == 0
    assert ledger_is_clean()


def test_an_event_that_raises_is_answered_500_and_recorded_failed_and_the_others_apply_once(webhooks, monkeypatch):
    real_grant = ledger.grant_pack_once

    def grant_then_fail_for_boom(session, **kwargs):
        granted = real_grant(session, **kwargs)
        if kwargs["user_id"] == "u_boom":
            raise RuntimeError("disk on fire")  # after its grant was written: the rollback must take it back
        return granted

    monkeypatch.setattr(ledger, "grant_pack_once", grant_then_fail_for_boom)
    before, boom, after = (checkout_completed(user_id=user, item="pack_250") for user in ("u_x", "u_boom", "u_y"))

    async def scenario():
        async with running_sidecar() as (client, writer):
            _, group = await as_one_group(client, writer, [before, boom, after])
            return group

    group = asyncio.run(scenario())
    assert [r.status_code for r in group] == [200, 500, 200]
    assert [r.json()["status"] for r in group] == ["processed", "failed", "processed"]
    row = stored(boom["id"])
    assert (row.status, row.attempts) == ("failed", 1) and "disk on fire" in row.error
    assert (balance("u_x"), balance("u_boom"), balance("u_y")) == (250, 0, 250)
    assert (entries("u_x"), entries("u_boom"), entries("u_y")) == (1, 0, 1)
    assert ledger_is_clean()


def test_a_group_whose_commit_fails_is_applied_event_by_event(webhooks, monkeypatch):
    packs = [checkout_completed(user_id=f"u_c{n}", item="pack_100") for n in range(3)]
    refused = []
    real_together = events.ingest_together

    def together_but_the_commit_is_refused(deliveries, *, engine, **kwargs):
        def refuse(_connection):
            if threading.current_thread().name == "webhook-group-writer":
                refused.append(len(deliveries))
                raise RuntimeError("commit refused")

        if refused:
            return real_together(deliveries, engine=engine, **kwargs)
        sa_event.listen(engine, "commit", refuse)
        try:
            return real_together(deliveries, engine=engine, **kwargs)
        finally:
            sa_event.remove(engine, "commit", refuse)

    monkeypatch.setattr(events, "ingest_together", together_but_the_commit_is_refused)

    async def scenario():
        async with running_sidecar() as (client, writer):
            with writer_commits() as commits:
                _, group = await as_one_group(client, writer, packs)
            return group, commits

    group, commits = asyncio.run(scenario())
    assert refused == [3]
    assert answers(group) == [(200, "processed", False)] * 3
    assert len(commits) == 1 + 1 + 3  # the first event; the group's COMMIT, refused; each of its events alone
    assert [balance(f"u_c{n}") for n in range(3)] == [100] * 3
    assert [entries(f"u_c{n}") for n in range(3)] == [1] * 3 and ledger_is_clean()


def test_events_waiting_for_a_grouped_event_are_retried_after_its_answer(webhooks):
    waiting = paid_invoice("invoice.paid", user_id=None, customer="cus_later", invoice_id="in_later")
    purchase = checkout_completed(user_id="u_later", item="pack_100", customer="cus_later")
    other = checkout_completed(user_id="u_other", item="pack_100")

    async def scenario():
        async with running_sidecar() as (client, writer):
            assert (await post(client, waiting)).json()["status"] == "needs_attention"
            _, group = await as_one_group(client, writer, [other, purchase])
            return group

    group = asyncio.run(scenario())
    assert answers(group) == [(200, "processed", False)] * 2
    assert stored(waiting["id"]).status == "processed"  # the purchase linked cus_later to u_later
    assert balance("u_later") == 200 and balance("u_other") == 100 and ledger_is_clean()


def test_forty_concurrent_deliveries_end_exact(database_url, monkeypatch):
    """The benchmark's full mix (subscriptions, both invoice types, renewals, packs, unknown types, 10% copies), all
    forty at once; on SQLite most of them queue behind the first and commit as one group."""
    for name, value in sidecar_environment(database_url).items():
        monkeypatch.setenv(name, value)
    from billing_core.settings import reset_settings_cache

    reset_settings_cache()
    workload = build_workload(events=40, seed=10, prefix="group")

    async def scenario():
        async with running_sidecar() as (client, writer):
            if writer is None:  # PostgreSQL: one transaction per event, on the thread pool
                return await asyncio.gather(*(post(client, e, secret=BENCH_SECRET) for e in workload.deliveries))
            first, rest = await as_one_group(client, writer, workload.deliveries[1:], secret=BENCH_SECRET,
                                             first=workload.deliveries[0])
            return [first, *rest]

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 40
    assert ledger_mismatches(db.get_engine(), workload) == []
    assert ledger_is_clean()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread SystemExit ends
def test_the_writer_outlives_an_error_of_its_own(webhooks, monkeypatch):
    evt = checkout_completed(user_id="u_again", item="pack_100")
    faults = [RuntimeError("writer bug"), SystemExit(3)]  # the second ends the thread; the next event starts another
    real_apply = GroupWriter._apply

    def faulty_apply(self, group):
        if faults:
            raise faults.pop(0)
        return real_apply(self, group)

    monkeypatch.setattr(GroupWriter, "_apply", faulty_apply)

    async def scenario():
        async with running_sidecar() as (client, _writer):
            return [await post(client, evt) for _ in range(3)]

    failed, ended, stored_now = asyncio.run(scenario())
    assert (failed.status_code, ended.status_code) == (500, 500)
    assert stored_now.status_code == 200 and stored_now.json()["duplicate"] is False
    assert balance("u_again") == 100 and stored(evt["id"]).attempts == 1


def test_stopping_finishes_the_queue_and_refuses_what_comes_after(webhooks):
    queued = [checkout_completed(user_id=f"u_s{n}", item="pack_100") for n in range(3)]
    late = checkout_completed(user_id="u_late", item="pack_100")

    async def scenario():
        async with running_sidecar() as (client, writer):
            taken = writer.status()["taken"]
            with db.write_connection(db.get_engine()):
                leading = asyncio.create_task(post(client, checkout_completed(user_id="u_s", item="pack_100")))
                await until(lambda: writer.status()["taken"] == taken + 1, "take the first event")
                rest = [asyncio.create_task(post(client, evt)) for evt in queued]
                await until(lambda: writer.status()["queued"] == len(queued), "queue the group")
                stopping = asyncio.get_running_loop().run_in_executor(None, writer.stop)
                await until(lambda: writer.status()["stopped"], "stop")
                refused = await post(client, late)
            finished = [await leading, *await asyncio.gather(*rest)]
            await stopping
            return finished, refused, await client.get("/healthz")

    finished, refused, health = asyncio.run(scenario())
    assert answers(finished) == [(200, "processed", False)] * 4
    assert refused.status_code == 500 and stored(late["id"]) is None
    assert health.status_code == 503  # a stopped writer refuses webhooks, so the sidecar isn't healthy
    assert health.json()["webhook_writer"] == {"queued": 0, "taken": 4, "groups": 2, "stopped": True}
    assert [balance(f"u_s{n}") for n in range(3)] == [100] * 3


def test_a_group_that_cannot_begin_under_another_process_lock_is_answered_500_at_once(webhooks, monkeypatch):
    """Another process holds SQLite's write lock past the busy timeout: the event the writer took alone and the
    group queued behind it are answered 500 with nothing stored (Stripe retries), after one busy timeout each: the
    group's events are not retried alone, and no failure is recorded (that would wait again). Once the lock is
    free, Stripe's retry applies them."""
    import sqlite3

    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    db.dispose_engines()  # the next engine connects with the short busy timeout
    first = checkout_completed(user_id="u_lock0", item="pack_100")
    queued = [checkout_completed(user_id=f"u_lock{n}", item="pack_100") for n in range(1, 4)]
    alone, recorded_failures = [], []
    real_ingest = events.ingest
    monkeypatch.setattr(events, "ingest", lambda evt, **kwargs: alone.append(evt["id"]) or real_ingest(evt, **kwargs))
    # a lock that outlasted the busy timeout is not recorded as a failure: that would wait the timeout again
    monkeypatch.setattr(events, "_record_failure", lambda *args, **kwargs: recorded_failures.append(args))
    other_process = sqlite3.connect(db.get_engine().url.database, isolation_level=None)

    async def scenario():
        async with running_sidecar() as (client, writer):
            other_process.execute("BEGIN IMMEDIATE")
            leading = asyncio.create_task(post(client, first))
            await until(lambda: writer.status()["taken"] == 1, "take the first event")
            rest = [asyncio.create_task(post(client, evt)) for evt in queued]
            await until(lambda: writer.status()["queued"] == len(queued), "queue the group")
            refused = [await leading, *await asyncio.gather(*rest)]
            went_alone = list(alone)
            assert [stored(evt["id"]) for evt in (first, *queued)] == [None] * 4
            other_process.execute("ROLLBACK")
            retried = [await post(client, evt) for evt in (first, *queued)]
            return refused, went_alone, retried

    try:
        refused, went_alone, retried = asyncio.run(scenario())
    finally:
        other_process.close()
    assert [r.status_code for r in refused] == [500] * 4
    assert went_alone == [first["id"]]  # the group's events were not each retried alone
    assert recorded_failures == []
    assert answers(retried) == [(200, "processed", False)] * 4
    assert [balance(f"u_lock{n}") for n in range(4)] == [100] * 4
