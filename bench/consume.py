"""Credits API: the latency of one spend as an account's history grows, and spends per second with 16
concurrent callers, against the running sidecar.

    .venv/bin/python bench/consume.py [--spends 3000] [--database sqlite|postgresql] [--database-url URL]
                                      [--history-sizes 1,1000,10000,100000] [--history-spends 300]

The sidecar runs as a subprocess (`python -m billing_core serve-webhooks`) on a fresh database whose
accounts hold pack credits. Three scenarios, with real HTTP over keep-alive connections:
- `history`: one caller spends one credit at a time from each of four accounts whose ledgers hold 1,
  1,000, 10,000 and 100,000 entries (packs bought and spent out, closed, then one open pack), written in bulk
  exactly as the ledger writes them; p50 and p99 per account, and p50 at the largest against p50 at 1
  (target: within 1.5x);
- `spread`: 16 callers spend across 200 accounts (the usual case: many agents, many users; target
  >= 1,000 spends/s on SQLite);
- `one_account`: every caller spends from the same account (the worst case: one row lock), with more
  asked for than it holds, so the last spends are refused with 402.
In `spread` and `one_account` 5% of the requests repeat an earlier reference (a retried spend). Afterwards
the ledger must be exact: each balance is what it held minus the spends that were answered 200 (once per
reference), never below zero, every answered spend has exactly one Consumption row, and `check-ledger`
finds every lot and account total equal to the entries. One JSON line per figure.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, Request, database, emit, free_port, machine, note, run_load, running, sidecar_command  # noqa: E402
from stripe_mix import API_TOKEN, sidecar_environment  # noqa: E402

RETRIED_SHARE = 0.05


def seed_accounts(url: str, *, accounts: int, credits: int) -> list[str]:
    from billing_core import db, ledger

    users = [f"agent_user_{n:05d}" for n in range(accounts)]
    engine = db.get_engine(url)
    for user_id in users:
        with db.write_session(engine) as session:
            ledger.grant_pack(session, user_id=user_id, credits=credits, source_key=f"bench-seed:{user_id}")
    return users


def _spend_key(user_id: str, reference: str) -> str:
    """The key ledger.consume gives a spend's first entry."""
    digest = hashlib.sha256("\x00".join((user_id, reference)).encode()).hexdigest()[:32]
    return f"spend:{digest}:0"


def build_history(url: str, user_id: str, *, entries: int, open_credits: int = 10_000_000) -> int:
    """An account whose ledger holds `entries` entries, inserted in bulk as the ledger would have written them:
    packs of 90 credits bought and spent out by 9 spends each (closed lots), then one open pack with a few
    spends. Its credit_lot rows and totals match (check-ledger verifies). Returns its balance."""
    from billing_core import db
    from billing_core.models import Account, Consumption, CreditLot, LedgerEntry, utcnow

    now = utcnow()
    blocks, rest = divmod(entries - 1, 10)
    rest_spends = rest  # the open pack's own spends
    at = now - timedelta(seconds=entries + 10)
    lots, rows, consumptions = [], [], []
    spends = 0

    def add_entry(credits: int, kind: str, key: str, lot_key: str, **extra) -> None:
        nonlocal at
        at += timedelta(seconds=1)
        rows.append({"user_id": user_id, "credits": credits, "kind": kind, "source_key": key, "lot_key": lot_key,
                     "lot_source": None, "expires_at": None, "subscription_id": None, "period_end": None,
                     "payment_id": None, "reference": None, "operator": None, "reason": None, "allowance_from": None,
                     "allowance_to": None, "created_at": at, **extra})

    def add_pack(key: str, credits: int, spend_count: int, spend_each: int) -> None:
        nonlocal spends
        add_entry(credits, "pack_grant", key, key, lot_source="pack")
        created = at
        for _ in range(spend_count):
            reference = f"history-{spends}"
            spends += 1
            add_entry(-spend_each, "spend", _spend_key(user_id, reference), key, reference=reference)
            consumptions.append({"user_id": user_id, "reference": reference, "credits": spend_each,
                                 "balance_after": 0, "spendable_after": 0, "created_at": at})
        remaining = credits - spend_count * spend_each
        lots.append({"lot_key": key, "user_id": user_id, "source": "pack", "granted": credits,
                     "remaining": remaining, "held": 0, "expires_at": None, "subscription_id": None,
                     "period_end": None, "payment_id": None, "allowance_from": None, "allowance_to": None,
                     "closed": remaining == 0, "closed_at": at if remaining == 0 else None, "created_at": created})

    for block in range(blocks):
        add_pack(f"bench-history:{user_id}:{block}", 90, 9, 10)
    add_pack(f"bench-history:{user_id}:open", open_credits, rest_spends, 1)
    balance = open_credits - rest_spends
    engine = db.get_engine(url)
    with engine.begin() as conn:
        conn.execute(Account.__table__.insert(), [{"user_id": user_id, "email": None, "flagged": False,
                                                   "open_disputes": 0, "balance": balance, "debt": 0,
                                                   "created_at": now - timedelta(days=400), "updated_at": now}])
        for table, values in ((LedgerEntry, rows), (CreditLot, lots), (Consumption, consumptions)):
            for start in range(0, len(values), 20_000):
                conn.execute(table.__table__.insert(), values[start:start + 20_000])
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return balance


def ledger_check_problems(url: str) -> list[str]:
    from billing_core import db
    from billing_core.ledger_check import check_ledger

    with db.read_session(db.get_engine(url)) as session:
        return [f"check-ledger: {row['what']} of {row['user_id']}: {row['problem']}"
                for row in check_ledger(session).mismatches]


def history_scenario(*, kind: str, url_option: str | None, tmp: Path, sizes: list[int], spends: int) -> bool:
    """p50/p99 of one spend (one caller) on accounts whose ledgers hold `sizes` entries."""
    from billing_core import db

    with database(kind, tmp / "history" if kind == "sqlite" else tmp, url=url_option) as url:
        users = {size: f"history_{size:06d}" for size in sizes}
        initial = {users[size]: build_history(url, users[size], entries=size) for size in sizes}
        db.dispose_engines()
        port = free_port()
        with running(sidecar_command(port), env=sidecar_environment(url), log_path=tmp / "history.log",
                     port=port) as server:
            run_load(server.base_url, requests_for([(users[sizes[0]], f"warm-{n}", 1) for n in range(50)]),
                     concurrency=1)
            initial[users[sizes[0]]] -= 50
            results = {}
            for size in sizes:
                plan = [(users[size], f"timed-{n}", 1) for n in range(spends)]
                results[size] = run_load(server.base_url, requests_for(plan), concurrency=1, server=server)
        problems = []
        from billing_core import ledger

        with db.read_session(db.get_engine(url)) as session:
            for size in sizes:
                user = users[size]
                answered = results[size].statuses.count(200)
                if answered != spends:
                    problems.append(f"{user}: {spends - answered} spends not answered 200")
                held = ledger.balance(session, user)
                if held != initial[user] - answered:
                    problems.append(f"{user}: balance {held}, expected {initial[user]} - {answered}")
        problems += ledger_check_problems(url)
        db.dispose_engines()
    for size in sizes:
        result = results[size]
        emit({"benchmark": "consume", "scenario": "history", "database": kind, "ledger_entries": size,
              "spends": spends, "concurrency": 1, "p50_ms": result.percentile_ms(50),
              "p99_ms": result.percentile_ms(99),
              "server_cpu_ms_per_spend": round(result.server_cpu / spends * 1000, 2), "machine": machine()})
    first, last = results[sizes[0]].percentile_ms(50), results[sizes[-1]].percentile_ms(50)
    ratio = round(last / first, 2) if first else None
    emit({"benchmark": "consume", "figure": "history_p50_ratio", "database": kind,
          "ledger_entries": [sizes[0], sizes[-1]], "ratio": ratio, "target": 1.5,
          "met": ratio is not None and ratio <= 1.5})
    emit({"benchmark": "consume", "figure": "ledger_check", "scenario": "history", "database": kind,
          "exact": not problems, "problems": problems[:10]})
    return not problems


def plan_spends(users: list[str], *, count: int, seed: int) -> list[tuple[str, str, int]]:
    """(user, reference, credits) in send order; a few repeat an earlier (user, reference, credits)."""
    rng = random.Random(seed)
    spends: list[tuple[str, str, int]] = []
    for n in range(count):
        if spends and rng.random() < RETRIED_SHARE:
            spends.append(rng.choice(spends))
        else:
            spends.append((rng.choice(users), f"run-{seed}-{n}", rng.randint(1, 5)))
    return spends


def requests_for(spends: list[tuple[str, str, int]]) -> list[Request]:
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    return [Request("POST", f"/api/accounts/{quote(user, safe='')}/consume",
                    json.dumps({"credits": credits, "reference": reference}).encode(), headers)
            for user, reference, credits in spends]


def balances(url: str, users: list[str]) -> dict[str, int]:
    from billing_core import db, ledger

    with db.read_session(db.get_engine(url)) as session:
        return {user: ledger.balance(session, user) for user in users}


def ledger_problems(url: str, spends, result, *, initial: dict[str, int]) -> list[str]:
    """Balances must equal what they held minus each reference answered 200, counted once."""
    from sqlalchemy import func, select

    from billing_core import db, ledger
    from billing_core.models import Consumption

    spent: dict[str, int] = {user: 0 for user in initial}
    seen: set[tuple[str, str]] = set()
    problems = []
    for (user, reference, credits), status in zip(spends, result.statuses):
        if status == 200 and (user, reference) not in seen:
            seen.add((user, reference))
            spent[user] += credits
        elif status not in (200, 402):
            problems.append(f"{user} {reference}: HTTP {status}")
    with db.read_session(db.get_engine(url)) as session:
        for user, held in initial.items():
            now_held = ledger.balance(session, user)
            if now_held != held - spent[user] or now_held < 0:
                problems.append(f"{user}: balance {now_held}, expected {held} - {spent[user]}")
        prefix = spends[0][1].rsplit("-", 1)[0] + "-"  # this run's references, not the warm-up's
        rows = session.execute(select(func.count()).select_from(Consumption)
                               .where(Consumption.reference.startswith(prefix))).scalar_one()
    if rows != len(seen):
        problems.append(f"{rows} Consumption rows for {len(seen)} answered references")
    return problems


def scenario(name: str, *, kind: str, url_option: str | None, tmp: Path, accounts: int, credits: int,
             spends_count: int, concurrency: int, seed: int) -> bool:
    from billing_core import db

    with database(kind, tmp / name if kind == "sqlite" else tmp, url=url_option) as url:
        users = seed_accounts(url, accounts=accounts, credits=credits)
        db.dispose_engines()
        spends = plan_spends(users, count=spends_count, seed=seed)
        warm = plan_spends(users, count=50, seed=seed + 1000)
        port = free_port()
        env = sidecar_environment(url)
        with running(sidecar_command(port), env=env, log_path=tmp / f"{name}.log", port=port) as server:
            run_load(server.base_url, requests_for(warm), concurrency=concurrency)
            initial = balances(url, users)  # after the warm-up's spends
            result = run_load(server.base_url, requests_for(spends), concurrency=concurrency, server=server)
        problems = ledger_problems(url, spends, result, initial=initial) + ledger_check_problems(url)
        db.dispose_engines()
    counts = result.status_counts()
    emit({"benchmark": "consume", "scenario": name, "database": kind, "requests": len(spends),
          "accounts": accounts, "concurrency": concurrency, "spends_per_s": round(result.rate, 1),
          "p50_ms": result.percentile_ms(50), "p99_ms": result.percentile_ms(99), "seconds": round(result.elapsed, 2),
          "server_cpu_ms_per_spend": round(result.server_cpu / len(spends) * 1000, 2), "statuses": counts, "machine": machine()}
         | ({"target_spends_per_s": 1000, "met": result.rate >= 1000} if name == "spread" and kind == "sqlite" else {}))
    emit({"benchmark": "consume", "figure": "ledger_check", "scenario": name, "database": kind,
          "exact": not problems, "problems": problems[:10]})
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spends", type=int, default=3000, help="requests per scenario (default 3000)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--database-url", help="PostgreSQL server (default TEST_DATABASE_URL or the local one)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--history-sizes", default="1,1000,10000,100000",
                        help="ledger entries of the accounts the history scenario spends from (comma-separated)")
    parser.add_argument("--history-spends", type=int, default=300, help="timed spends per history account")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.history_sizes.split(",") if size.strip()]
    if args.database_url and args.database_url.startswith("postgres"):
        args.database = "postgresql"  # a PostgreSQL URL means PostgreSQL
    note(f"{args.spends} spends per scenario at concurrency {args.concurrency}; machine {machine()}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-consume-") as tmp_name:
        tmp = Path(tmp_name)
        for name in ("history", "spread", "one_account"):
            (tmp / name).mkdir()
        if sizes:
            ok &= history_scenario(kind=args.database, url_option=args.database_url, tmp=tmp, sizes=sizes,
                                   spends=args.history_spends)
        common = dict(kind=args.database, url_option=args.database_url, tmp=tmp, spends_count=args.spends,
                      concurrency=args.concurrency, seed=args.seed)
        ok &= scenario("spread", accounts=200, credits=10_000, **common)
        # about 3 credits a spend: the account runs dry two thirds of the way through
        ok &= scenario("one_account", accounts=1, credits=2 * args.spends, **common)
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
