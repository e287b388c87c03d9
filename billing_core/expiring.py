"""Subscription credits about to expire unspent: a day-by-day forecast and the accounts that hold the most.

Only subscription lots expire (packs and adjustments never do). A lot counts when it is still open, holds
credits, and its expiry time falls in (now, now + days]: one range scan of `credit_lot` over the partial index
`ix_credit_lot_expiring` (open subscription lots by expiry). Credits a dispute holds are not counted (they are
not the lot's any more); credits frozen by a past-due subscription are, since they expire too.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import false, literal_column, select
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


def expiring_lots(session: Session, *, after: datetime, until: datetime) -> list[tuple[str, int, datetime]]:
    """(user id, credits left, expires at) of each open subscription lot expiring in (after, until]."""
    # the literals match the partial index's predicate, so both databases use it
    stmt = select(LOT.c.user_id, LOT.c.remaining, LOT.c.expires_at).where(
        LOT.c.closed == false(), LOT.c.source == SUBSCRIPTION, LOT.c.expires_at > after,
        LOT.c.expires_at <= until, LOT.c.remaining > 0)
    return [(user_id, int(credits), as_utc(expires_at)) for user_id, credits, expires_at in session.execute(stmt)]


def expiring_credits(session: Session, *, days: int, now: datetime | None = None,
                     tz_name: str = "UTC") -> ExpiringReport:
    days = check_days(days)
    now = as_utc(now or utcnow())
    lots = expiring_lots(session, after=now, until=now + timedelta(days=days))
    per_account: dict[str, dict] = {}
    per_day: dict[date, int] = defaultdict(int)
    tz = zone(tz_name)
    for user_id, credits, expires_at in lots:
        row = per_account.setdefault(user_id, {"user_id": user_id, "credits": 0, "expires_at": expires_at})
        row["credits"] += credits
        row["expires_at"] = min(row["expires_at"], expires_at)
        per_day[expires_at.astimezone(tz).date()] += credits
    first = now.astimezone(tz).date()
    by_day = [{"day": first + timedelta(days=i), "credits": per_day.get(first + timedelta(days=i), 0)}
              for i in range(days + 1)]
    accounts = sorted(per_account.values(), key=lambda r: (-r["credits"], r["expires_at"], r["user_id"]))
    return ExpiringReport(days=days, now=now, total=sum(r["credits"] for r in accounts), accounts=accounts,
                          by_day=by_day)


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
