"""Group commit for the webhook sidecar on SQLite: one writer thread applies queued events in one transaction.

SQLite admits one writer at a time, so the sidecar applies its events on one thread of its own. Each event
would pay for its own BEGIN IMMEDIATE, ORM session, COMMIT and thread hand-off; here the thread takes every
event queued while it was busy (at most MAX_GROUP) and applies them in order with `events.ingest_together`:
one transaction, one commit, one hand-off back to the event loop for the whole group. Each event's answer is
released only after that commit.

A group is all or nothing. When one of its events can't be applied with the others (it needs a person, it
raises, the database fails under it), everything is rolled back and the events are applied again in order: the
ones before it as a group, it alone with `events.ingest` (which records needs_attention or failed in a
transaction of its own, as for any event), then the ones after it as a group. A group of one is `events.ingest`,
exactly the path an event took before. A failure to commit applies every event of the group alone; a failure to
begin (another process held SQLite's write lock past the busy timeout) answers every event of the group 500 at
once, nothing stored, rather than waiting that timeout again for each.

Nothing here raises into the event loop or dies silently: an error of the writer itself fails the futures of
its group (the endpoint answers 500 and Stripe retries), and a thread that ends anyway fails whatever is still
queued and is replaced on the next submission. `stop()` finishes the queue and refuses what comes after it.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from . import events
from .settings import Settings

log = logging.getLogger("billing_core.group_commit")

MAX_GROUP = 64  # events per transaction: a full group of pack purchases holds the write lock ≈ 30 ms
STOP_TIMEOUT = 30.0  # seconds stop() waits for the queue to be finished
_STOP = object()


class WriterStopped(RuntimeError):
    """The writer is stopped (or its thread ended): the event was not stored, and is answered 500."""


@dataclass(slots=True)
class _Delivery:
    event: dict
    raw_payload: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass(slots=True)
class _Outcome:
    result: events.IngestResult | None = None
    error: BaseException | None = None


class GroupWriter:
    """One thread and a queue; `submit` (from the event loop) resolves once the event's effects are committed."""

    def __init__(self, *, engine: Engine, settings: Settings, max_group: int = MAX_GROUP):
        self._engine = engine
        self._settings = settings
        self._max_group = max_group
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._taken = 0  # deliveries the thread has taken from the queue
        self._groups = 0  # groups it has answered

    async def submit(self, event: dict, raw_payload: str) -> events.IngestResult:
        """The event's result once committed; raises what `events.ingest` would, or WriterStopped."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(_Delivery(event, raw_payload, loop, future))
        return await future

    def status(self) -> dict:
        """Deliveries waiting in the queue, taken by the thread so far, groups answered, and whether stopped."""
        return {"queued": self._queue.qsize(), "taken": self._taken, "groups": self._groups, "stopped": self._stopped}

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Apply and answer what is queued, then end the thread; a later submission raises WriterStopped."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)  # behind everything queued: _put refuses anything after it
        if thread is not None:
            thread.join(timeout)

    def _put(self, delivery: _Delivery) -> None:
        with self._lock:
            if self._stopped:
                raise WriterStopped("the webhook writer is stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="webhook-group-writer", daemon=True)
                self._thread.start()
            self._queue.put(delivery)

    # --- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        group: list[_Delivery] = []
        try:
            while group := self._next_group():
                self._answer(group, self._outcomes(group))
                group = []
        except BaseException as exc:
            log.error("webhook writer thread ended by %s; the next event starts another", type(exc).__name__)
            raise
        finally:  # stopped, or ended by something no handler caught: nothing may be left waiting
            with self._lock:
                self._thread = None
                left = group + self._drain()
            if left:
                log.error("webhook writer thread ended with %d events unanswered; they are answered 500", len(left))
                self._answer(left, [_Outcome(error=WriterStopped("the webhook writer ended"))] * len(left))

    def _next_group(self) -> list[_Delivery]:
        """Blocks for the first delivery, then takes whatever else is queued; [] once stopped."""
        first = self._queue.get()
        if first is _STOP:
            return []
        group = [first]
        while len(group) < self._max_group:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # this group first, then stop
                break
            group.append(item)
        self._taken += len(group)
        return group

    def _drain(self) -> list[_Delivery]:
        left = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return left
            if item is not _STOP:
                left.append(item)

    def _outcomes(self, group: list[_Delivery]) -> list[_Outcome]:
        try:
            return self._apply(group)
        except Exception as exc:  # a fault of the writer itself: these get 500 (Stripe retries), the thread goes on
            log.error("webhook writer failed on a group of %d events: %s", len(group),
                      events.safe_error_text(exc, self._settings))
            return [_Outcome(error=exc)] * len(group)

    def _apply(self, group: list[_Delivery]) -> list[_Outcome]:
        if len(group) <= 1:
            return [self._alone(delivery) for delivery in group]
        try:
            results = events.ingest_together([(d.event, d.raw_payload) for d in group],
                                              engine=self._engine, settings=self._settings)
        except events.GroupFailed as failed:  # rolled back: before it as a group, it alone, after it as a group
            at = failed.index
            log.debug("event %s could not be applied in a group (%s); applying it alone", group[at].event.get("id"),
                      type(failed.__cause__).__name__ if failed.__cause__ else "it asks Stripe first")
            return self._apply(group[:at]) + [self._alone(group[at])] + self._apply(group[at + 1:])
        except events.GroupNotBegun as exc:  # waited the busy timeout already: every event 500, nothing stored
            log.error("a group of %d events could not begin its transaction, so none was stored (Stripe retries): %s",
                      len(group), exc)
            return [_Outcome(error=exc)] * len(group)
        except Exception as exc:  # the transaction could not commit: nobody's event in particular
            log.warning("a group of %d events was not committed (%s); applying them one by one", len(group),
                        events.safe_error_text(exc, self._settings))
            return [self._alone(delivery) for delivery in group]
        return [_Outcome(result=result) for result in results]

    def _alone(self, delivery: _Delivery) -> _Outcome:
        """Today's path for one event: its own transaction; needs_attention and failed recorded by ingest."""
        try:
            return _Outcome(result=events.ingest(delivery.event, raw_payload=delivery.raw_payload, engine=self._engine,
                                                 settings=self._settings, retry_waiting_now=False))
        except Exception as exc:  # the database itself failed: the endpoint answers 500
            return _Outcome(error=exc)

    def _answer(self, group: list[_Delivery], outcomes: list[_Outcome]) -> None:
        """One hand-off per event loop (in practice one per group) sets every future of the group."""
        self._groups += 1  # counted before the answers go: whoever reads status() after an answer sees its group
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for delivery, outcome in zip(group, outcomes):
            by_loop[delivery.loop].append((delivery.future, outcome))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, answers)
            except RuntimeError:  # that loop is closed: nobody waits for these answers any more
                pass


def _settle(answers: list[tuple[asyncio.Future, _Outcome]]) -> None:
    for future, outcome in answers:
        if future.done():  # the request was cancelled meanwhile
            continue
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.result)
