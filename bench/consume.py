"""Credits API throughput: spends per second with 16 concurrent callers against the running sidecar.

    .venv/bin/python bench/consume.py [--spends 3000] [--database sqlite|postgresql] [--database-url URL]

The sidecar runs as a subprocess (`python -m billing_core serve-webhooks`) on a fresh database whose
accounts hold pack credits. Two scenarios, each over 16 keep-alive connections with real HTTP:
- `spread`: spends across 200 accounts (the usual case: many agents, many users);
- `one_account`: every caller spends from the same account (the worst case: one row lock), with more
  asked for than it holds, so the last spends are refused with 402.
5% of the requests repeat an earlier reference (a retried spend). Afterwards the ledger must be exact:
each balance is what it held minus the spends that were answered 200 (once per reference), never below
zero, and every answered spend has exactly one Consumption row. One JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
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
        problems = ledger_problems(url, spends, result, initial=initial)
        db.dispose_engines()
    counts = result.status_counts()
    emit({"benchmark": "consume", "scenario": name, "database": kind, "requests": len(spends),
          "accounts": accounts, "concurrency": concurrency, "spends_per_s": round(result.rate, 1),
          "p50_ms": result.percentile_ms(50), "p99_ms": result.percentile_ms(99), "seconds": round(result.elapsed, 2),
          "server_cpu_ms_per_spend": round(result.server_cpu / len(spends) * 1000, 2), "statuses": counts, "machine": machine()})
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
    args = parser.parse_args(argv)
    if args.database_url and args.database_url.startswith("postgres"):
        args.database = "postgresql"  # a PostgreSQL URL means PostgreSQL
    note(f"{args.spends} spends per scenario at concurrency {args.concurrency}; machine {machine()}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-consume-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "spread").mkdir()
        (tmp / "one_account").mkdir()
        common = dict(kind=args.database, url_option=args.database_url, tmp=tmp, spends_count=args.spends,
                      concurrency=args.concurrency, seed=args.seed)
        ok &= scenario("spread", accounts=200, credits=10_000, **common)
        # about 3 credits a spend: the account runs dry two thirds of the way through
        ok &= scenario("one_account", accounts=1, credits=2 * args.spends, **common)
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
