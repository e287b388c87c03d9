"""Subscription credits about to expire unspent: a day-by-day forecast and the accounts that hold the most.

Only subscription lots expire (packs and adjustments never do). A lot counts when it is still open, holds
credits, and its expiry time falls in (now, now + days]: one range scan of `credit_lot` over the partial index
`ix_credit_lot_open_expiry` (open lots by expiry, covering credits, source and user, so no table row is read). Credits a dispute holds are not counted (they are
not the lot's any more); credits frozen by a past-due subscription are, since they expire too.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import false, func, literal_column, select
from sqlmodel import Session

from .formatting import as_utc, zone
from .models import CreditLot, utcnow

MAX_DAYS = 366
LOT = CreditLot.__table__
SUBSCRIPTION = literal_column("'subscription'")


@dataclass
class ExpiringReport:
    days: int
    now: datetime
    total: int
    account_count: int = 0
    accounts: list[dict] = field(default_factory=list)  # user_id, credits, expires_at (earliest), largest first
    by_day: list[dict] = field(default_factory=list)  # day (operator's date), credits

    def as_dict(self, *, limit: int | None = None) -> dict:
        rows = self.accounts if limit is None else self.accounts[:limit]
        return {"days": self.days, "total": self.total,
                "accounts": [{"user_id": r["user_id"], "credits": r["credits"],
                              "expires_at": iso_utc(r["expires_at"])} for r in rows]}


def iso_utc(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_days(days) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be a whole number from 1 to {MAX_DAYS}, not {days!r}")
    return days


def _in_window(after: datetime, until: datetime) -> list:
    # the literals match the partial index's predicate, so both databases use it
    return [LOT.c.closed == false(), LOT.c.source == SUBSCRIPTION, LOT.c.expires_at > after,
            LOT.c.expires_at <= until, LOT.c.remaining > 0]


def expiring_lots(session: Session, *, after: datetime, until: datetime) -> list[tuple[str, int, datetime]]:
    """(user id, credits left, expires at) of each open subscription lot expiring in (after, until]."""
    stmt = (select(LOT.c.user_id, LOT.c.remaining, LOT.c.expires_at).where(*_in_window(after, until)))
    return [(user_id, int(credits), as_utc(expires_at)) for user_id, credits, expires_at in session.execute(stmt)]


def _time_bucket(session: Session, *, whole_hours: bool):
    """'YYYY-MM-DD HH' (or '... HH:MM' for a zone whose offset isn't whole hours) of the lot's UTC expiry, in SQL."""
    column = LOT.c.expires_at
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(column, "YYYY-MM-DD HH24" if whole_hours else "YYYY-MM-DD HH24:MI")
    return func.substr(column, 1, 13 if whole_hours else 16)  # SQLite keeps 'YYYY-MM-DD HH:MM:SS...' text


def _offset_is_whole_hours(tz, around: datetime, days: int) -> bool:
    return all((around + timedelta(days=d)).astimezone(tz).utcoffset().total_seconds() % 3600 == 0
               for d in (0, days))


def expiring_credits(session: Session, *, days: int, now: datetime | None = None, tz_name: str = "UTC",
                     limit: int | None = None) -> ExpiringReport:
    """Totals, the accounts holding the most (all of them, or the first `limit`) and credits per local day,
    each aggregated in SQL over the open subscription lots of the window."""
    days = check_days(days)
    now = as_utc(now or utcnow())
    until = now + timedelta(days=days)
    window = _in_window(now, until)
    credits = func.sum(LOT.c.remaining)
    earliest = func.min(LOT.c.expires_at)
    account_count = session.execute((
        select(func.count(func.distinct(LOT.c.user_id))).where(*window))).scalar_one()
    per_account = (select(LOT.c.user_id, credits, earliest).where(*window)
                                       .group_by(LOT.c.user_id).order_by(credits.desc(), earliest, LOT.c.user_id))
    if limit is not None:
        per_account = per_account.limit(limit)
    accounts = [{"user_id": user_id, "credits": int(amount), "expires_at": as_utc(_as_datetime(first))}
                for user_id, amount, first in session.execute(per_account)]
    tz = zone(tz_name)
    whole_hours = _offset_is_whole_hours(tz, now, days)
    bucket = _time_bucket(session, whole_hours=whole_hours)
    per_day: dict[date, int] = defaultdict(int)
    total = 0
    for key, amount in session.execute((
            select(bucket, credits).where(*window).group_by(bucket))):
        total += int(amount)
        start = datetime.strptime(key, "%Y-%m-%d %H" if whole_hours else "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
        per_day[start.astimezone(tz).date()] += int(amount)
    first = now.astimezone(tz).date()
    by_day = [{"day": first + timedelta(days=i), "credits": per_day.get(first + timedelta(days=i), 0)}
              for i in range(days + 1)]
    return ExpiringReport(days=days, now=now, total=int(total), account_count=int(account_count),
                          accounts=accounts, by_day=by_day)


def _as_datetime(value) -> datetime:
    """MIN() over a SQLite datetime column comes back as its stored text."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def expiring_csv(report: ExpiringReport, *, tz_name: str = "UTC") -> str:
    """The accounts of a report, for outreach: user id, credits expiring, earliest expiry (UTC and local)."""
    import csv
    import io

    from .reports import _csv_cell

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["user_id", "credits_expiring", "earliest_expiry_utc", f"earliest_expiry_{tz_name}"])
    tz = zone(tz_name)
    for row in report.accounts:
        writer.writerow([_csv_cell(row["user_id"]), row["credits"], iso_utc(row["expires_at"]),
                         row["expires_at"].astimezone(tz).strftime("%Y-%m-%d %H:%M")])
    return out.getvalue()
