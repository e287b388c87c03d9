"""`python -m billing_core check-ledger [--json]`: the kept lots and account totals against the entries.

`ledger_entry` is the record of truth; `credit_lot` and the account's `balance` and `debt` are kept beside it
in the same transactions. This check reads the whole ledger (it is not on any hot path) and reports every
place where they disagree. It never repairs anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import and_, case, exists, false, func, literal, or_, select, text
from sqlmodel import Session

from .models import DISPUTE_KINDS_SQL, Account, CreditLot, LedgerEntry

LOT = CreditLot.__table__
ENTRY = LedgerEntry.__table__
ACCOUNT = Account.__table__


@dataclass
class LedgerCheck:
    lots_checked: int = 0
    accounts_checked: int = 0
    mismatches: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_dict(self) -> dict:
        return {"ok": self.ok, "lots_checked": self.lots_checked, "accounts_checked": self.accounts_checked,
                "mismatches": self.mismatches}


def _lot_sums():
    """Per lot key and user: the sum of the entries, what disputes hold, and how many `expire` entries."""
    dispute = text(DISPUTE_KINDS_SQL)
    return (select(ENTRY.c.lot_key, ENTRY.c.user_id, func.sum(ENTRY.c.credits).label("total"),
                   (-func.sum(case((dispute, ENTRY.c.credits), else_=0))).label("held"),
                   func.sum(case((ENTRY.c.kind == "expire", 1), else_=0)).label("marks"))
            .where(ENTRY.c.lot_key.is_not(None))
            .group_by(ENTRY.c.lot_key, ENTRY.c.user_id)
            .subquery("sums"))


def lot_mismatches(session: Session) -> list[dict]:
    sums = _lot_sums()
    grant = ENTRY.alias("grant_entry")
    total, held, marks = (func.coalesce(sums.c.total, 0), func.coalesce(sums.c.held, 0),
                          func.coalesce(sums.c.marks, 0))
    stmt = (select(LOT.c.lot_key, LOT.c.user_id, LOT.c.granted, LOT.c.remaining, LOT.c.held, LOT.c.closed,
                   total, held, marks, grant.c.credits, grant.c.user_id)
            .select_from(LOT.outerjoin(sums, and_(sums.c.lot_key == LOT.c.lot_key, sums.c.user_id == LOT.c.user_id))
                         .outerjoin(grant, grant.c.source_key == LOT.c.lot_key))
            .where(or_(LOT.c.remaining != total, LOT.c.held != held, grant.c.id.is_(None),
                       grant.c.credits != LOT.c.granted, grant.c.user_id != LOT.c.user_id,
                       and_(marks > 0, LOT.c.closed == false())))
            .order_by(LOT.c.id))
    found = []
    for key, user, granted, remaining, held_, closed, e_total, e_held, e_marks, g_credits, g_user in session.execute(stmt):
        problems = []
        if remaining != e_total:
            problems.append(f"remaining {remaining} but its entries sum to {e_total}")
        if held_ != e_held:
            problems.append(f"held {held_} but its dispute entries hold {e_held}")
        if g_credits is None:
            problems.append("no grant entry has this lot's key")
        elif g_credits != granted or g_user != user:
            problems.append(f"granted {granted} to {user} but its grant entry gives {g_credits} to {g_user}")
        if e_marks and not closed:
            problems.append("an expire entry closed it but the lot is open")
        found.append({"what": "lot", "lot_key": key, "user_id": user, "remaining": remaining,
                      "entries_sum": int(e_total), "held": held_, "entries_held": int(e_held),
                      "problem": "; ".join(problems)})
    return found


def orphan_entries(session: Session) -> list[dict]:
    """Grant entries without their lot, and entries naming a lot that isn't one of their user's."""
    lot_of_grant = exists().where(LOT.c.lot_key == ENTRY.c.source_key)
    lot_named = exists().where(LOT.c.lot_key == ENTRY.c.lot_key, LOT.c.user_id == ENTRY.c.user_id)
    stmt = (select(ENTRY.c.id, ENTRY.c.user_id, ENTRY.c.kind, ENTRY.c.source_key, ENTRY.c.lot_key, ENTRY.c.credits,
                   case((and_(ENTRY.c.lot_source.is_not(None), ~lot_of_grant), literal("grant entry without a lot")),
                        else_=literal("entry names a lot its user doesn't have")))
            .where(or_(and_(ENTRY.c.lot_source.is_not(None), ~lot_of_grant),
                       and_(ENTRY.c.lot_key.is_not(None), ~lot_named)))
            .order_by(ENTRY.c.id))
    return [{"what": "entry", "entry_id": entry_id, "user_id": user, "kind": kind, "source_key": key,
             "lot_key": lot_key, "credits": credits, "problem": problem}
            for entry_id, user, kind, key, lot_key, credits, problem in session.execute(stmt)]


def account_mismatches(session: Session) -> list[dict]:
    """Each account's debt must equal its entries without a lot, and its balance its open lots plus that debt."""
    debts = (select(ENTRY.c.user_id, func.sum(ENTRY.c.credits).label("debt"))
             .where(ENTRY.c.lot_key.is_(None)).group_by(ENTRY.c.user_id).subquery("debts"))
    opened = (select(LOT.c.user_id, func.sum(LOT.c.remaining).label("open_credits"))
              .where(LOT.c.closed == false()).group_by(LOT.c.user_id).subquery("opened"))
    debt, open_credits = func.coalesce(debts.c.debt, 0), func.coalesce(opened.c.open_credits, 0)
    stmt = (select(ACCOUNT.c.user_id, ACCOUNT.c.balance, ACCOUNT.c.debt, debt, open_credits)
            .select_from(ACCOUNT.outerjoin(debts, debts.c.user_id == ACCOUNT.c.user_id)
                         .outerjoin(opened, opened.c.user_id == ACCOUNT.c.user_id))
            .where(or_(ACCOUNT.c.debt != debt, ACCOUNT.c.balance != debt + open_credits))
            .order_by(ACCOUNT.c.user_id))
    return [{"what": "account", "user_id": user, "balance": stored_balance, "expected_balance": int(e_debt + e_open),
             "debt": stored_debt, "expected_debt": int(e_debt),
             "problem": f"balance {stored_balance} and debt {stored_debt}; the entries and open lots give "
                        f"{int(e_debt + e_open)} and {int(e_debt)}"}
            for user, stored_balance, stored_debt, e_debt, e_open in session.execute(stmt)]


def check_ledger(session: Session) -> LedgerCheck:
    result = LedgerCheck()
    result.lots_checked = int(session.execute(select(func.count()).select_from(LOT)).scalar_one())
    result.accounts_checked = int(session.execute(select(func.count()).select_from(ACCOUNT)).scalar_one())
    result.mismatches = lot_mismatches(session) + orphan_entries(session) + account_mismatches(session)
    return result


def format_check(result: LedgerCheck) -> str:
    lines = [f"checked {result.lots_checked:,} lots and {result.accounts_checked:,} accounts against the ledger entries"]
    for row in result.mismatches:
        where = row.get("lot_key") or row.get("source_key") or ""
        lines.append(f"  {row['what']} of {row['user_id']}{' ' + where if where else ''}: {row['problem']}")
    lines.append("the lots and totals match the entries" if result.ok
                 else f"{len(result.mismatches)} mismatch(es); nothing was repaired")
    return "\n".join(lines)
