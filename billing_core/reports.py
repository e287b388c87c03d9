"""What the dashboard shows, computed in SQL: aggregates (GROUP BY) and bounded pages of rows.

Nothing here loads a whole table, and nothing on a page load scans the ledger or the payments: time
series read the hourly rollups the database keeps with every write (billing_core/rollups.py, migration
0007), plus the rows of the partial hours at a range's two ends, so a range's totals are exact. Hours
are folded into days and months of the operator's timezone in Python, so day and month boundaries are
the operator's, DST included.

Money is never added across currencies: every money aggregate is grouped by currency.

Definitions the pages rely on:
- MRR (as Stripe defines it): the monthly amount of the subscriptions active at a moment, as billed for
  their current period (discounts applied; a mid-period upgrade adds its proration scaled to a month).
  Past-due subscriptions are counted apart (past-due MRR). Trials bill nothing. See rollups.py.
- New MRR: MRR of subscriptions that start, or restart after a gap, in a month. Churned MRR: MRR of
  subscriptions whose last billed span ended in the month (canceled, or not renewed) with none after it.
- Cash collected: money collected by payments that were paid (status other than unpaid/failed), net of
  refunds and of disputes lost, dated by the payment's creation.
- Credits outstanding: the sum of every account's balance (open lots and debt).
  Their worth is shown at the cheapest price a customer pays per pack credit:
  CREDIT_WORTH_CENTS = 6 (the 1000-credit pack, $60.00); the 100-credit pack's $0.10 is the upper end.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Iterator

from sqlalchemy import and_, case, cast, false, func, literal, null, or_, select, String, union_all
from sqlmodel import Session

from . import ledger
from .catalog import PLANS
from .formatting import as_utc, local_time, zone
from .models import (Account, CheckoutLink, CreditLot, Dispute, LedgerEntry, Payment, StripeEvent, Subscription,
                     utcnow)
from .rollups import LedgerHourly, MrrHourly, PaymentHourly, SubscriptionPeriod
from .settings import Settings

SUBSCRIBED_STATUSES = ("active", "trialing", "past_due", "unpaid")
UNCOLLECTED_STATUSES = ("unpaid", "failed")
CREDIT_WORTH_CENTS = 6
CREDIT_WORTH_RANGE_CENTS = (6, 10)
WEBHOOK_QUIET_HOURS = 24
MAX_PAGE_SIZE = 500
MAX_CSV_ROWS = 100_000
EVENT_STATUSES = ("received", "processed", "ignored", "needs_attention", "failed")
BALANCE_BUCKETS = ((None, -1, "below 0"), (0, 0, "0"), (1, 99, "1–99"), (100, 499, "100–499"),
                   (500, 999, "500–999"), (1000, 4999, "1,000–4,999"), (5000, None, "5,000+"))


def _page(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(int(limit), MAX_PAGE_SIZE)), max(0, int(offset))


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _hour_key(session: Session, column):
    """'YYYY-MM-DD HH' of a stored (UTC) time, in SQL. SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' text,
    so a prefix is the hour (much cheaper than strftime at a million rows)."""
    if _dialect(session) == "postgresql":
        return func.to_char(func.date_trunc("hour", column), "YYYY-MM-DD HH24")
    return func.substr(column, 1, 13)


def local_month_starts(*, since: datetime, until: datetime, tz_name: str) -> list[datetime]:
    """The first instants (UTC) of the operator's months from the one holding `since` up to past `until`."""
    tz = zone(tz_name)
    local = as_utc(since).astimezone(tz)
    month = datetime(local.year, local.month, 1, tzinfo=tz)
    starts = []
    while True:
        starts.append(month.astimezone(timezone.utc))
        if month.astimezone(timezone.utc) > until:
            return starts
        month = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=tz)


@lru_cache(maxsize=65_536)
def _local_period(hour_key: str, tz_name: str, granularity: str) -> str:
    start = datetime.fromisoformat(f"{hour_key}:00:00+00:00")
    local = local_time(start, tz_name)
    return local.strftime("%Y-%m" if granularity == "month" else "%Y-%m-%d")


# --- Home -------------------------------------------------------------------------------------

@dataclass
class SubscriptionStats:
    by_tier_status: dict[tuple[str, str], int]
    mrr: dict[str, int]  # currency -> MRR in minor units (active subscriptions)
    past_due_mrr: dict[str, int]  # currency -> MRR of past-due subscriptions, counted apart

    def count(self, tier: str, statuses=("active", "trialing")) -> int:
        return sum(n for (t, s), n in self.by_tier_status.items() if t == tier and s in statuses)

    @property
    def active_by_tier(self) -> dict[str, int]:
        return {plan.key: self.count(plan.key) for plan in PLANS}

    @property
    def past_due(self) -> int:
        return sum(n for (_, s), n in self.by_tier_status.items() if s in ("past_due", "unpaid"))


def subscription_stats(session: Session, *, now: datetime | None = None) -> SubscriptionStats:
    rows = session.execute(select(Subscription.tier, Subscription.status, func.count())
                           .group_by(Subscription.tier, Subscription.status)).all()
    counts = {(tier, status): int(n) for tier, status, n in rows}
    mrr = mrr_at(session, at=now or utcnow())
    return SubscriptionStats(by_tier_status=counts, mrr=mrr.get("active", {}), past_due_mrr=mrr.get("past_due", {}))


def _collected():
    return Payment.status.not_in(UNCOLLECTED_STATUSES)


def _net_amount():
    return Payment.amount_cents - Payment.amount_refunded - Payment.amount_disputed_lost


# --- hours and rollups ----------------------------------------------------------------------------

def hour_key(moment: datetime) -> str:
    """The rollups' key of the UTC hour holding `moment`."""
    return as_utc(moment).astimezone(timezone.utc).strftime("%Y-%m-%d %H")


def _hour_floor(moment: datetime) -> datetime:
    return as_utc(moment).astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def _hour_ceil(moment: datetime) -> datetime:
    floor = _hour_floor(moment)
    return floor if floor == as_utc(moment) else floor + timedelta(hours=1)


def _split_hours(since: datetime, until: datetime) -> tuple[list[tuple[datetime, datetime, int]], tuple[str, str] | None]:
    """[since, until) as whole hours read from a rollup (hour keys [first, stop)) and partial hours read from
    the rows, each (low, high, sign). When `until` falls in the current hour, that hour comes whole from the
    rollup less the rows written after `until` (sign -1: at most the minutes since), so the busiest hour,
    the one under way, is never read row by row."""
    if since >= until:
        return [], None
    first, last = _hour_ceil(since), _hour_floor(until)
    if first >= last:
        return [(since, until, 1)], None
    edges = [(since, first, 1)] if since < first else []
    stop = last
    if last < until:
        if last == _hour_floor(utcnow()):
            stop = last + timedelta(hours=1)
            edges.append((until, stop, -1))
        else:
            edges.append((last, until, 1))
    return edges, (hour_key(first), hour_key(stop))

@dataclass
class RevenueTotals:
    currency: str
    gross_cents: int = 0
    refunded_cents: int = 0
    disputed_lost_cents: int = 0
    payments: int = 0

    @property
    def net_cents(self) -> int:
        return self.gross_cents - self.refunded_cents - self.disputed_lost_cents


def _rows(session: Session, stmt) -> list:
    """Plain rows through Core: thousands of rollup rows without the ORM's per-row cost."""
    return session.connection().execute(stmt).all()


def _collected_payments(session: Session, *, since: datetime, until: datetime, by_hour: bool = False):
    """(hour key or None, kind, currency, payments, gross, refunded, lost) of collected payments created in
    [since, until): whole hours from payment_hourly, the partial hours at the ends from payment."""
    edges, whole = _split_hours(since, until)
    rows = []
    if whole is not None:
        hour = PaymentHourly.hour if by_hour else literal(None)
        keys = (PaymentHourly.hour,) if by_hour else ()
        rows += _rows(session, select(hour, PaymentHourly.kind, PaymentHourly.currency,
                                      func.sum(PaymentHourly.payments), func.sum(PaymentHourly.amount_cents),
                                      func.sum(PaymentHourly.refunded_cents),
                                      func.sum(PaymentHourly.disputed_lost_cents))
                      .where(PaymentHourly.collected.is_(True), PaymentHourly.hour >= whole[0],
                             PaymentHourly.hour < whole[1])
                      .group_by(*keys, PaymentHourly.kind, PaymentHourly.currency))
    rows = [(*row, 1) for row in rows]
    hour = _hour_key(session, Payment.created_at) if by_hour else literal(None)
    for low, high, sign in edges:
        keys = (hour,) if by_hour else ()
        rows += [(*row, sign) for row in _rows(
            session, select(hour, func.coalesce(Payment.kind, "other"), Payment.currency, func.count(),
                            func.sum(Payment.amount_cents), func.sum(Payment.amount_refunded),
                            func.sum(Payment.amount_disputed_lost))
            .where(_collected(), Payment.created_at >= low, Payment.created_at < high)
            .group_by(*keys, Payment.kind, Payment.currency))]
    return [(key, kind or "other", currency, *(sign * int(v or 0) for v in values))
            for key, kind, currency, *values, sign in rows]



def revenue_since(session: Session, *, since: datetime, until: datetime | None = None) -> list[RevenueTotals]:
    """Cash collected in [since, until), one total per currency, largest first."""
    totals: dict[str, RevenueTotals] = {}
    for _, _, currency, count, gross, refunded, lost in _collected_payments(
            session, since=since, until=until or utcnow()):
        found = totals.setdefault(currency, RevenueTotals(currency))
        found.payments += count
        found.gross_cents += gross
        found.refunded_cents += refunded
        found.disputed_lost_cents += lost
    return sorted((t for t in totals.values() if t.payments), key=lambda t: (-t.net_cents, t.currency))


def _lapsed(session: Session, *, after: datetime | None, until: datetime) -> int:
    """Credits left in lots whose expiry time fell in (after, until]: they stopped counting then. A lot
    closed by its expiry time keeps what was left in `remaining`; an explicit expiry drew it to zero (and
    counts as its `expire` entry instead)."""
    conditions = [CreditLot.expires_at <= until]
    if after is not None:
        conditions.append(CreditLot.expires_at > after)
    return int(session.execute(select(func.coalesce(func.sum(CreditLot.remaining), 0)).where(*conditions))
               .scalar_one())


def _expired_open_lots(session: Session, now: datetime) -> dict[str, int]:
    """Per account, what is left in lots past their expiry time that no write has closed yet: the account's
    balance still holds it (the ledger closes them on the account's next write). Read row by row through
    the partial index of open lots by expiry time (a GROUP BY would make SQLite walk the open lots by user)."""
    found: dict[str, int] = defaultdict(int)
    for user_id, remaining in _rows(session, select(CreditLot.user_id, CreditLot.remaining)
                                    .where(CreditLot.closed == false(), CreditLot.expires_at <= now)):
        found[user_id] += int(remaining)
    return found


def credits_outstanding(session: Session, *, now: datetime | None = None) -> int:
    """The sum of all balances as of now: the account totals (the balance index), less lots that expired
    since their account's last write (the partial index of open lots by expiry time)."""
    total = int(session.execute(select(func.coalesce(func.sum(Account.balance), 0))).scalar_one())
    return total - sum(_expired_open_lots(session, now or utcnow()).values())

def credits_worth_cents(credits: int) -> int:
    return max(credits, 0) * CREDIT_WORTH_CENTS


def flagged_accounts(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(Account).where(Account.flagged.is_(True)))
               .scalar_one())


def account_count(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(Account)).scalar_one())


def event_status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status)).all()
    counts = {status: 0 for status in EVENT_STATUSES}
    counts.update({status: int(n) for status, n in rows})
    return counts


@dataclass
class WebhookHealth:
    last_received_at: datetime | None
    quiet_hours: float | None
    warning: str | None


def webhook_health(session: Session, *, settings: Settings, now: datetime | None = None) -> WebhookHealth:
    """When the last event came in from Stripe, and a warning when none has for a long time."""
    now = now or utcnow()
    last = session.execute(select(func.max(StripeEvent.received_at))
                           .where(StripeEvent.source == "webhook")).scalar_one()
    last = as_utc(last) if last else None
    quiet = (now - last).total_seconds() / 3600 if last else None
    warning = None
    if settings.stripe_configured:
        if last is None:
            warning = ("no webhook event has ever arrived: check the endpoint in the Stripe dashboard "
                       "(or `stripe listen`) and STRIPE_WEBHOOK_SECRET")
        elif quiet >= WEBHOOK_QUIET_HOURS:
            warning = (f"no webhook event for {int(quiet)} hours: check that the sidecar is running and "
                       "that Stripe can reach it")
    return WebhookHealth(last_received_at=last, quiet_hours=quiet, warning=warning)


# --- accounts ---------------------------------------------------------------------------------

def _prefix_range(column, prefix: str):
    return and_(column >= prefix, column < prefix + "\U0010ffff")


def search_accounts(session: Session, query: str, *, limit: int = 20) -> list[dict]:
    """Exact user id, Stripe customer id or email first, then user ids and emails starting with it."""
    query = (query or "").strip()
    if not query:
        return []
    limit, _ = _page(limit, 0)
    columns = (Account.user_id, Account.email, Account.stripe_customer_id, Account.flagged, Account.created_at)
    exact = session.execute(select(*columns).where(or_(
        Account.user_id == query, Account.stripe_customer_id == query,
        Account.email == query, Account.email == query.lower())).limit(limit)).all()
    found = {row.user_id: row for row in exact}
    for column in (Account.user_id, Account.email):
        if len(found) >= limit:
            break
        rows = session.execute(select(*columns).where(_prefix_range(column, query))
                               .order_by(column).limit(limit - len(found))).all()
        for row in rows:
            found.setdefault(row.user_id, row)
    return [{"user_id": r.user_id, "email": r.email, "stripe_customer_id": r.stripe_customer_id,
             "flagged": bool(r.flagged), "created_at": r.created_at} for r in found.values()]


def customer_timeline(session: Session, *, user_id: str, limit: int = 50, offset: int = 0) -> list[dict]:
    """Everything that explains a balance, newest first: ledger entries, payments, disputes, links issued
    (amounts with their payment's currency)."""
    limit, offset = _page(limit, offset)
    text = lambda column: cast(column, String)  # noqa: E731
    entries = select(
        LedgerEntry.created_at.label("at"), literal("ledger").label("category"), LedgerEntry.kind.label("kind"),
        LedgerEntry.credits.label("credits"), cast(null(), LedgerEntry.credits.type).label("amount_cents"),
        func.coalesce(LedgerEntry.reason, LedgerEntry.reference, text(LedgerEntry.subscription_id)).label("detail"),
        LedgerEntry.operator.label("operator"), LedgerEntry.expires_at.label("expires_at"),
        text(LedgerEntry.payment_id).label("ref"), cast(null(), Payment.currency.type).label("currency"),
    ).where(LedgerEntry.user_id == user_id)
    payments = select(
        Payment.created_at, literal("payment"), Payment.status, Payment.credits_granted, Payment.amount_cents,
        func.coalesce(Payment.item, literal("?")), null(), null(), text(Payment.id), Payment.currency,
    ).where(Payment.user_id == user_id)
    refunds = select(
        Payment.updated_at, literal("refund"), Payment.status, null(),
        Payment.amount_refunded + Payment.amount_disputed_lost, func.coalesce(Payment.item, literal("?")),
        null(), null(), text(Payment.id), Payment.currency,
    ).where(Payment.user_id == user_id, (Payment.amount_refunded + Payment.amount_disputed_lost) > 0)
    disputes = select(
        Dispute.created_at, literal("dispute"), Dispute.status, null(), Dispute.amount_cents,
        Dispute.id, null(), null(), text(Dispute.payment_id), Payment.currency,
    ).select_from(Dispute).outerjoin(Payment, Payment.id == Dispute.payment_id).where(Dispute.user_id == user_id)
    links = select(
        CheckoutLink.created_at, literal("link"), CheckoutLink.status, null(), null(), CheckoutLink.item,
        CheckoutLink.operator, CheckoutLink.expires_at, CheckoutLink.session_id, null(),
    ).where(CheckoutLink.user_id == user_id)
    union = union_all(entries, payments, refunds, disputes, links).subquery()
    rows = session.execute(select(union).order_by(union.c.at.desc(), union.c.category, union.c.ref.desc())
                           .limit(limit).offset(offset)).all()
    return [dict(row._mapping) for row in rows]


def timeline_length(session: Session, *, user_id: str) -> int:
    counts = [
        select(func.count()).select_from(LedgerEntry).where(LedgerEntry.user_id == user_id),
        select(func.count()).select_from(Payment).where(Payment.user_id == user_id),
        select(func.count()).select_from(Payment).where(
            Payment.user_id == user_id, (Payment.amount_refunded + Payment.amount_disputed_lost) > 0),
        select(func.count()).select_from(Dispute).where(Dispute.user_id == user_id),
        select(func.count()).select_from(CheckoutLink).where(CheckoutLink.user_id == user_id),
    ]
    return sum(int(session.execute(stmt).scalar_one()) for stmt in counts)


def account_overview(session: Session, *, user_id: str, now: datetime | None = None) -> dict:
    """The ledger's account summary plus what this account paid: `payments` (collected) and `net_paid`,
    {currency: minor units net of refunds and lost disputes}."""
    summary = ledger.account_summary(session, user_id, now=now).as_dict()
    rows = session.execute(select(Payment.currency, func.count(), func.coalesce(func.sum(_net_amount()), 0))
                           .where(Payment.user_id == summary["user_id"], _collected())
                           .group_by(Payment.currency).order_by(Payment.currency)).all()
    summary["payments"] = sum(int(n) for _, n, _ in rows)
    summary["net_paid"] = {currency: int(net) for currency, _, net in rows}
    return summary


LEDGER_CSV_COLUMNS = ("created_at", "kind", "credits", "lot_key", "lot_source", "expires_at", "subscription_id",
                      "period_end", "payment_id", "reference", "operator", "reason", "source_key")


def ledger_csv_lines(session: Session, *, user_id: str, tz_name: str) -> Iterator[str]:
    """Every ledger entry of one account as CSV lines, oldest first, read in batches (times in the operator's
    timezone; text a spreadsheet would run as a formula defused)."""
    out = io.StringIO()
    writer = csv.writer(out)

    def line(values) -> str:
        out.seek(0)
        out.truncate()
        writer.writerow(values)
        return out.getvalue()

    yield line(LEDGER_CSV_COLUMNS)
    columns = [getattr(LedgerEntry, name) for name in LEDGER_CSV_COLUMNS]
    stmt = (select(*columns).where(LedgerEntry.user_id == user_id)
            .order_by(LedgerEntry.created_at, LedgerEntry.id).execution_options(yield_per=5000))
    for row in session.execute(stmt):
        values = dict(row._mapping)
        for name in ("created_at", "expires_at"):
            if values[name] is not None:
                values[name] = local_time(values[name], tz_name).isoformat()
        yield line([_csv_cell(values[n]) for n in LEDGER_CSV_COLUMNS])


def ledger_csv(session: Session, *, user_id: str, tz_name: str) -> str:
    return "".join(ledger_csv_lines(session, user_id=user_id, tz_name=tz_name))

# --- payments ---------------------------------------------------------------------------------

@dataclass
class PaymentFilter:
    start: datetime | None = None  # inclusive, UTC
    end: datetime | None = None  # exclusive, UTC
    item: str | None = None  # a catalog key, or "plan" / "pack" for every item of that kind
    status: str | None = None
    user_id: str | None = None

    def conditions(self) -> list:
        found = []
        if self.start is not None:
            found.append(Payment.created_at >= self.start)
        if self.end is not None:
            found.append(Payment.created_at < self.end)
        if self.item in ("plan", "pack"):
            found.append(Payment.kind == self.item)
        elif self.item:
            found.append(Payment.item == self.item)
        if self.status:
            found.append(Payment.status == self.status)
        if self.user_id:
            found.append(Payment.user_id == self.user_id.strip())
        return found


PAYMENT_COLUMNS = (Payment.id, Payment.created_at, Payment.user_id, Payment.item, Payment.kind, Payment.status,
                   Payment.amount_cents, Payment.amount_refunded, Payment.amount_disputed_lost, Payment.currency,
                   Payment.credits_granted, Payment.source, Payment.checkout_session_id, Payment.invoice_id)


def payments_page(session: Session, *, filters: PaymentFilter, limit: int = 50, offset: int = 0) -> list[dict]:
    limit, offset = _page(limit, offset)
    stmt = (select(*PAYMENT_COLUMNS).where(*filters.conditions())
            .order_by(Payment.created_at.desc(), Payment.id.desc()).limit(limit).offset(offset))
    return [dict(row._mapping) for row in session.execute(stmt).all()]


@dataclass
class PaymentTotals:
    currency: str
    count: int
    amount_cents: int
    refunded_cents: int
    disputed_lost_cents: int
    credits_granted: int

    @property
    def net_cents(self) -> int:
        return self.amount_cents - self.refunded_cents - self.disputed_lost_cents


def payments_totals(session: Session, *, filters: PaymentFilter) -> list[PaymentTotals]:
    """Totals of the filtered payments, one per currency (most payments first); amounts count only money
    that was collected. Filters of time and plan/pack only read the hourly rollup (and the partial hours
    at the range's ends); any other filter reads the matching payments."""
    if filters.status or filters.user_id or (filters.item and filters.item not in ("plan", "pack")):
        rows = _payment_totals_rows(session, filters)
    else:
        rows = _payment_totals_from_rollup(session, filters)
    totals: dict[str, PaymentTotals] = {}
    for currency, *values in rows:
        found = totals.setdefault(currency, PaymentTotals(currency, 0, 0, 0, 0, 0))
        for name, value in zip(("count", "amount_cents", "refunded_cents", "disputed_lost_cents", "credits_granted"),
                               values):
            setattr(found, name, getattr(found, name) + int(value or 0))
    return sorted((t for t in totals.values() if t.count), key=lambda t: (-t.count, t.currency))


def _payment_totals_rows(session: Session, filters: PaymentFilter, *, since: datetime | None = None,
                         until: datetime | None = None) -> list:
    collected = case((_collected(), Payment.amount_cents), else_=0)
    conditions = filters.conditions()
    if since is not None:
        conditions += [Payment.created_at >= since, Payment.created_at < until]
    return _rows(session, select(Payment.currency, func.count(), func.sum(collected), func.sum(Payment.amount_refunded),
                                 func.sum(Payment.amount_disputed_lost), func.sum(Payment.credits_granted))
                 .where(*conditions).group_by(Payment.currency))


def _payment_totals_from_rollup(session: Session, filters: PaymentFilter) -> list:
    if filters.start is None:
        first = session.execute(select(func.min(PaymentHourly.hour))).scalar_one()
        start = datetime.fromisoformat(f"{first}:00:00+00:00") if first else utcnow()
    else:
        start = filters.start
    end = filters.end or utcnow() + timedelta(hours=2)  # past the newest payment's hour
    edges, whole = _split_hours(start, end)
    rows = []
    if whole is not None:
        conditions = [PaymentHourly.hour >= whole[0], PaymentHourly.hour < whole[1]]
        if filters.item:
            conditions.append(PaymentHourly.kind == filters.item)
        amount = case((PaymentHourly.collected.is_(True), PaymentHourly.amount_cents), else_=0)
        rows += _rows(session, select(PaymentHourly.currency, func.sum(PaymentHourly.payments), func.sum(amount),
                                      func.sum(PaymentHourly.refunded_cents),
                                      func.sum(PaymentHourly.disputed_lost_cents),
                                      func.sum(PaymentHourly.credits_granted))
                      .where(*conditions).group_by(PaymentHourly.currency))
    edge_filters = PaymentFilter(item=filters.item)
    for low, high, sign in edges:
        rows += [(currency, *(sign * int(v or 0) for v in values))
                 for currency, *values in _payment_totals_rows(session, edge_filters, since=low, until=high)]
    if filters.start is None:  # anything dated before the first rollup hour (none unless clocks disagree)
        rows += _payment_totals_rows(session, edge_filters, since=datetime.min.replace(tzinfo=timezone.utc),
                                     until=start)
    if filters.end is None:
        rows += _payment_totals_rows(session, edge_filters, since=end, until=datetime.max.replace(tzinfo=timezone.utc))
    return rows


def payment_statuses(session: Session) -> list[str]:
    return sorted(s for (s,) in session.execute(select(Payment.status).distinct()).all())


def payments_csv(session: Session, *, filters: PaymentFilter, tz_name: str, max_rows: int = MAX_CSV_ROWS) -> str:
    """The filtered payments as CSV (amounts in minor units, times in the operator's timezone), at most max_rows."""
    out = io.StringIO()
    writer = csv.writer(out)
    names = [c.key for c in PAYMENT_COLUMNS]
    writer.writerow(names)
    stmt = (select(*PAYMENT_COLUMNS).where(*filters.conditions())
            .order_by(Payment.created_at.desc(), Payment.id.desc()).limit(max_rows))
    for row in session.execute(stmt.execution_options(yield_per=5000)):
        values = dict(row._mapping)
        values["created_at"] = local_time(values["created_at"], tz_name).isoformat()
        writer.writerow([_csv_cell(values[n]) for n in names])
    return out.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value):
    """Text a spreadsheet would run as a formula (user ids come from outside) gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


# --- checkout links ---------------------------------------------------------------------------

def recent_links(session: Session, *, user_id: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
    limit, offset = _page(limit, offset)
    stmt = select(CheckoutLink.created_at, CheckoutLink.user_id, CheckoutLink.item, CheckoutLink.status,
                  CheckoutLink.expires_at, CheckoutLink.completed_at, CheckoutLink.operator, CheckoutLink.url,
                  CheckoutLink.session_id)
    if user_id:
        stmt = stmt.where(CheckoutLink.user_id == user_id)
    stmt = stmt.order_by(CheckoutLink.created_at.desc(), CheckoutLink.id.desc()).limit(limit).offset(offset)
    return [dict(row._mapping) for row in session.execute(stmt).all()]


# --- webhook events ---------------------------------------------------------------------------

@dataclass
class EventFilter:
    status: str | None = None
    type: str | None = None  # exact type, or a prefix ending in "." / "*" (e.g. "invoice.")
    user_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    event_id: str | None = None

    def conditions(self) -> list:
        found = []
        if self.status:
            found.append(StripeEvent.status == self.status)
        if self.type:
            prefix = self.type.rstrip("*")
            found.append(_prefix_range(StripeEvent.type, prefix) if self.type.endswith(("*", "."))
                         else StripeEvent.type == self.type)
        if self.user_id:
            user = self.user_id.strip()
            found.append(or_(StripeEvent.user_id == user, StripeEvent.assigned_user_id == user))
        if self.start is not None:
            found.append(StripeEvent.received_at >= self.start)
        if self.end is not None:
            found.append(StripeEvent.received_at < self.end)
        if self.event_id:
            found.append(StripeEvent.id == self.event_id.strip())
        return found


EVENT_COLUMNS = (StripeEvent.id, StripeEvent.type, StripeEvent.status, StripeEvent.received_at,
                 StripeEvent.created, StripeEvent.livemode, StripeEvent.attempts, StripeEvent.source,
                 StripeEvent.user_id, StripeEvent.assigned_user_id, StripeEvent.error, StripeEvent.processed_at)


def events_page(session: Session, *, filters: EventFilter, limit: int = 50, offset: int = 0) -> list[dict]:
    """A page of events without their payloads (those can be large; fetch one with event_detail)."""
    limit, offset = _page(limit, offset)
    stmt = (select(*EVENT_COLUMNS).where(*filters.conditions())
            .order_by(StripeEvent.received_at.desc(), StripeEvent.id.desc()).limit(limit).offset(offset))
    return [dict(row._mapping) for row in session.execute(stmt).all()]


def events_count(session: Session, *, filters: EventFilter) -> int:
    return int(session.execute(select(func.count()).select_from(StripeEvent).where(*filters.conditions()))
               .scalar_one())


def event_types(session: Session) -> list[str]:
    return [t for (t,) in session.execute(select(StripeEvent.type).group_by(StripeEvent.type)
                                          .order_by(StripeEvent.type)).all()]


def event_detail(session: Session, event_id: str) -> dict | None:
    row = session.execute(select(*EVENT_COLUMNS, StripeEvent.payload, StripeEvent.api_version)
                          .where(StripeEvent.id == event_id)).first()
    return dict(row._mapping) if row else None


# --- revenue and credits over time --------------------------------------------------------------

def revenue_series(session: Session, *, since: datetime, until: datetime, tz_name: str,
                   granularity: str = "day") -> list[dict]:
    """Cash collected per local day (or month), net of refunds and lost disputes, split into plans and
    packs and by currency: [{period, kind, currency, net_cents}]. Days fold hourly sums; months are one
    range query each."""
    totals: dict[tuple[str, str, str], int] = defaultdict(int)
    if granularity == "month":
        for period, low, high in _month_ends(since=since, until=until, tz_name=tz_name):
            for _, kind, currency, _, gross, refunded, lost in _collected_payments(session, since=low, until=high):
                totals[(period, kind, currency)] += gross - refunded - lost
    else:
        for key, kind, currency, _, gross, refunded, lost in _collected_payments(
                session, since=since, until=until, by_hour=True):
            totals[(_local_period(key, tz_name, granularity), kind, currency)] += gross - refunded - lost
    return [{"period": p, "kind": k, "currency": c, "net_cents": v} for (p, k, c), v in sorted(totals.items())]

def _mrr_sums(session: Session, *, since_hour: str | None, stop_hour: str, inclusive: bool = False):
    """{(currency, state): (change, new)} summed over the hours in [since_hour, stop_hour) (or up to and
    including stop_hour)."""
    conditions = [MrrHourly.hour <= stop_hour if inclusive else MrrHourly.hour < stop_hour]
    if since_hour is not None:
        conditions.append(MrrHourly.hour >= since_hour)
    rows = _rows(session, select(MrrHourly.currency, MrrHourly.state, func.sum(MrrHourly.change_cents),
                                 func.sum(MrrHourly.new_cents))
                 .where(*conditions).group_by(MrrHourly.currency, MrrHourly.state))
    return {(currency, state): (int(change or 0), int(new or 0)) for currency, state, change, new in rows}

def mrr_at(session: Session, *, at: datetime) -> dict[str, dict[str, int]]:
    """MRR at a moment (to the hour): {state: {currency: minor units}}, states `active` and `past_due`."""
    found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows = session.execute(select(MrrHourly.state, MrrHourly.currency, func.sum(MrrHourly.change_cents))
                           .where(MrrHourly.hour <= hour_key(at))
                           .group_by(MrrHourly.state, MrrHourly.currency)).all()
    for state, currency, total in rows:
        if int(total or 0):
            found[state][currency] += int(total)
    return {state: dict(by_currency) for state, by_currency in found.items()}


def _month_ends(*, since: datetime, until: datetime, tz_name: str) -> list[tuple[str, datetime, datetime]]:
    """(local month, its first instant or since, its end or until) for each month from since's to until's."""
    starts = local_month_starts(since=since, until=until, tz_name=tz_name)
    found = []
    for start, end in zip(starts, starts[1:]):
        low, high = max(start, since), min(end, until)
        if low < high:
            found.append((local_time(start, tz_name).strftime("%Y-%m"), low, high))
    return found


def mrr_series(session: Session, *, since: datetime, until: datetime, tz_name: str) -> list[dict]:
    """MRR at each local month's end (the current month: at `until`), with the new and churned MRR of the
    month, per currency and state: [{period, currency, state, mrr_cents, new_cents, churned_cents}].
    The last point at `until` equals mrr_at(until), Home's MRR. Three queries: the MRR before the first
    month, the changes grouped by month, the churned spans grouped by month."""
    months = _month_ends(since=since, until=until, tz_name=tz_name)
    if not months:
        return []
    running = {key: change for key, (change, _) in _mrr_sums(session, since_hour=None,
                                                              stop_hour=hour_key(months[0][1])).items()}
    month = _month_of(MrrHourly.hour, months, key=hour_key)
    changes: dict[str, dict] = defaultdict(dict)
    for period, currency, state, change, new in _rows(
            session, select(month, MrrHourly.currency, MrrHourly.state, func.sum(MrrHourly.change_cents),
                            func.sum(MrrHourly.new_cents))
            .where(MrrHourly.hour >= hour_key(months[0][1]), MrrHourly.hour <= hour_key(until))
            .group_by(month, MrrHourly.currency, MrrHourly.state)):
        changes[period][(currency, state)] = (int(change or 0), int(new or 0))
    churned = _churned(session, months=months, until=until)
    found = []
    for period, _, _ in months:
        for key, (change, _) in changes[period].items():
            running[key] = running.get(key, 0) + change
        lost = churned.get(period, {})
        for currency, state in sorted(set(running) | set(lost)):
            values = (running.get((currency, state), 0), changes[period].get((currency, state), (0, 0))[1],
                      lost.get((currency, state), 0))
            if any(values):
                found.append({"period": period, "currency": currency, "state": state, "mrr_cents": values[0],
                              "new_cents": values[1], "churned_cents": values[2]})
    return found


def _churned(session: Session, *, months: list[tuple[str, datetime, datetime]],
             until: datetime) -> dict[str, dict[tuple[str, str], int]]:
    """MRR of spans that ended in the months (before `until`) with no span after them:
    {period: {(currency, state): cents}}."""
    month = _month_of(SubscriptionPeriod.ends_at, months)
    found: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    for period, currency, state, cents in _rows(
            session, select(month, SubscriptionPeriod.currency, SubscriptionPeriod.state,
                            func.sum(SubscriptionPeriod.amount_cents))
            .where(SubscriptionPeriod.has_successor == false(), SubscriptionPeriod.ends_at >= months[0][1],
                   SubscriptionPeriod.ends_at < until, SubscriptionPeriod.ends_at > SubscriptionPeriod.starts_at)
            .group_by(month, SubscriptionPeriod.currency, SubscriptionPeriod.state)):
        found[period][(currency, state)] = int(cents)
    return found

CREDIT_FLOW_KINDS = {
    "granted": ledger.GRANT_KINDS,
    "spent": ("spend",),
    "expired": ("expire",),
    "clawed back": ("clawback", ledger.DOWNGRADE_TAKEBACK),
}
FLOW_OF_KIND = {kind: flow for flow, kinds in CREDIT_FLOW_KINDS.items() for kind in kinds}


def _ledger_sums(session: Session, *, since: datetime, until: datetime) -> dict[str, int]:
    """{kind: credits} of the entries written in [since, until): whole hours from ledger_hourly, the
    partial hours at the ends from the entries (a covering index on created_at, kind, credits)."""
    edges, whole = _split_hours(since, until)
    kinds = list(FLOW_OF_KIND)
    rows = []
    if whole is not None:
        rows += _rows(session, select(LedgerHourly.kind, func.sum(LedgerHourly.credits))
                      .where(LedgerHourly.hour >= whole[0], LedgerHourly.hour < whole[1], LedgerHourly.kind.in_(kinds))
                      .group_by(LedgerHourly.kind))
    rows = [(*row, 1) for row in rows]
    for low, high, sign in edges:
        rows += [(*row, sign) for row in _rows(
            session, select(LedgerEntry.kind, func.sum(LedgerEntry.credits))
            .where(LedgerEntry.created_at >= low, LedgerEntry.created_at < high, LedgerEntry.kind.in_(kinds))
            .group_by(LedgerEntry.kind))]
    totals: dict[str, int] = defaultdict(int)
    for kind, credits, sign in rows:
        totals[kind] += sign * int(credits or 0)
    return totals


def _month_of(column, months: list[tuple[str, datetime, datetime]], *, key=lambda moment: moment,
              inclusive: bool = False):
    """SQL mapping a time (or an hour key) to the label of the month it falls in; months in order, the last
    one taking whatever comes after the others (the query's range bounds it)."""
    if len(months) == 1:
        return literal(months[0][0])
    return case(*[((column <= key(high)) if inclusive else (column < key(high)), period)
                  for period, _, high in months[:-1]], else_=months[-1][0])


def credit_flows(session: Session, *, since: datetime, now: datetime, tz_name: str) -> list[dict]:
    """Credits granted, spent, expired and clawed back per local month: [{period, flow, credits}].

    One pass over the hourly ledger rollup (and the partial hours at the ends), grouped by month in SQL.
    Expired counts both explicit expiries (cancellation, next period's grant) and what was left in lots
    whose expiry time passed, dated by that time (one pass over the lots' expiry index)."""
    months = _month_ends(since=since, until=now, tz_name=tz_name)
    if not months:
        return []
    kinds = list(FLOW_OF_KIND)
    edges, whole = _split_hours(months[0][1], now)
    by_month: dict[tuple[str, str], int] = defaultdict(int)
    if whole is not None:
        month = _month_of(LedgerHourly.hour, months, key=hour_key)
        for period, kind, credits in _rows(session, select(month, LedgerHourly.kind, func.sum(LedgerHourly.credits))
                                           .where(LedgerHourly.hour >= whole[0], LedgerHourly.hour < whole[1],
                                                  LedgerHourly.kind.in_(kinds)).group_by(month, LedgerHourly.kind)):
            by_month[(period, kind)] += int(credits or 0)
    for low, high, sign in edges:
        period = next(label for label, start, end in months if start <= low < end) if low < now else months[-1][0]
        for kind, credits in _rows(session, select(LedgerEntry.kind, func.sum(LedgerEntry.credits))
                                   .where(LedgerEntry.created_at >= low, LedgerEntry.created_at < high,
                                          LedgerEntry.kind.in_(kinds)).group_by(LedgerEntry.kind)):
            by_month[(period, kind)] += sign * int(credits or 0)
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for (period, kind), credits in by_month.items():
        totals[(period, FLOW_OF_KIND[kind])] += abs(credits)
    month = _month_of(CreditLot.expires_at, months, inclusive=True)
    for period, lapsed in _rows(session, select(month, func.sum(CreditLot.remaining))
                                .where(CreditLot.expires_at > months[0][1], CreditLot.expires_at <= now)
                                .group_by(month)):
        totals[(period, "expired")] += max(0, int(lapsed or 0))
    return [{"period": period, "flow": flow, "credits": totals[(period, flow)]}
            for period, _, _ in months for flow in CREDIT_FLOW_KINDS if totals[(period, flow)]]


def balance_distribution(session: Session, *, now: datetime | None = None) -> list[dict]:
    """How many accounts hold how many credits: [{bucket, accounts}]. One range count per bucket on the
    balance index, then the few accounts holding lots past their expiry time that no write has closed yet
    move to the bucket of what they really hold."""
    counts = {label: int(session.execute(select(func.count()).select_from(Account)
                                         .where(*_bucket_range(Account.balance, low, high))).scalar_one())
              for low, high, label in BALANCE_BUCKETS}
    lapsed = _expired_open_lots(session, now or utcnow())
    for user_id, balance in (_rows(session, select(Account.user_id, Account.balance)
                                   .where(Account.user_id.in_(list(lapsed)))) if lapsed else []):
        counts[_bucket_of(int(balance))] -= 1
        counts[_bucket_of(int(balance) - lapsed[user_id])] += 1
    return [{"bucket": label, "accounts": counts[label]} for _, _, label in BALANCE_BUCKETS]


def _bucket_range(balance, low: int | None, high: int | None) -> list:
    return ([balance >= low] if low is not None else []) + ([balance <= high] if high is not None else [])


def _bucket_of(balance: int) -> str:
    return next(label for low, high, label in BALANCE_BUCKETS
                if (low is None or balance >= low) and (high is None or balance <= high))

@dataclass
class Overview:
    """Everything Home shows, gathered in one read transaction."""
    subscriptions: SubscriptionStats
    revenue_30d: list[RevenueTotals]
    flagged_accounts: int
    accounts: int
    events: dict[str, int]
    webhook: WebhookHealth
    now: datetime = field(default_factory=utcnow)


def overview(session: Session, *, settings: Settings, now: datetime | None = None) -> Overview:
    now = now or utcnow()
    return Overview(subscriptions=subscription_stats(session, now=now),
                    revenue_30d=revenue_since(session, since=now - timedelta(days=30), until=now),
                    flagged_accounts=flagged_accounts(session), accounts=account_count(session),
                    events=event_status_counts(session), webhook=webhook_health(session, settings=settings, now=now),
                    now=now)
