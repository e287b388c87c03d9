"""Spends while webhooks stream in: what one kind of writer costs the other on one database.

    .venv/bin/python bench/mixed_load.py [--spends 1000] [--events 6000] [--database sqlite|postgresql]
                                         [--database-url URL] [--spend-concurrency 4]

One sidecar (`python -m billing_core serve-webhooks`) on a fresh database with 200 accounts holding pack credits.
First the spends alone (`--spend-concurrency` callers, one credit to five at a time across the accounts), then the
same number of spends again while a stream of pack purchases (bench/stripe_mix.py, 10% redeliveries) arrives over
16 more connections as fast as the sidecar takes them. On SQLite both share the one write lock: webhooks in
groups on one writer thread, spends on another. Prints p50/p99/max of the spends alone and during the stream, the
stream's events/s, and the ledger check afterwards (spends: each balance is what it held minus each reference
answered 200, counted once; webhooks: every pack granted once).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import database, emit, free_port, machine, note, run_load, running, sidecar_command  # noqa: E402
from consume import balances, ledger_check_problems, ledger_problems, plan_spends, requests_for, seed_accounts  # noqa: E402
from stripe_mix import build_pack_workload, ledger_mismatches, sidecar_environment, signed_deliveries  # noqa: E402
from webhooks import requests_for as webhook_requests  # noqa: E402

ACCOUNTS = 200
STREAM_CONCURRENCY = 16


def figure(name: str, result, *, kind: str, concurrency: int) -> dict:
    return {"benchmark": "mixed_load", "figure": name, "database": kind, "requests": len(result.statuses),
            "concurrency": concurrency, "per_s": round(result.rate, 1), "p50_ms": result.percentile_ms(50),
            "p99_ms": result.percentile_ms(99), "max_ms": round(max(result.latencies) * 1000, 1),
            "statuses": result.status_counts(), "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    from billing_core import db

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spends", type=int, default=1000, help="spends alone, and again during the stream")
    parser.add_argument("--events", type=int, default=6000, help="pack purchase deliveries in the stream")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--database-url", help="PostgreSQL server to use (default TEST_DATABASE_URL)")
    parser.add_argument("--spend-concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    if args.spends < 10 or args.events < 100 or args.spend_concurrency < 1:
        parser.error("--spends must be at least 10, --events at least 100, --spend-concurrency at least 1")

    workload = build_pack_workload(events=args.events, seed=5, prefix="mixed")
    stream = webhook_requests(signed_deliveries(workload.deliveries))
    with tempfile.TemporaryDirectory() as scratch, database(args.database, Path(scratch),
                                                                url=args.database_url) as url:
        users = seed_accounts(url, accounts=ACCOUNTS, credits=100_000)
        db.dispose_engines()
        alone_spends = plan_spends(users, count=args.spends, seed=11)
        mixed_spends = plan_spends(users, count=args.spends, seed=12)
        note(f"{ACCOUNTS} accounts, {args.spends} spends alone and {args.spends} during {len(stream)} deliveries; "
             f"machine {machine()}")
        port = free_port()
        with running(sidecar_command(port), env=sidecar_environment(url), log_path=Path(scratch) / "sidecar.log",
                     port=port) as server:
            run_load(server.base_url, requests_for(plan_spends(users, count=50, seed=10)), concurrency=2)
            before_alone = balances(url, users)
            alone = run_load(server.base_url, requests_for(alone_spends), concurrency=args.spend_concurrency)
            problems = ledger_problems(url, alone_spends, alone, initial=before_alone)
            before_mixed = balances(url, users)
            streamed = {}
            sender = threading.Thread(target=lambda: streamed.setdefault(
                "result", run_load(server.base_url, stream, concurrency=STREAM_CONCURRENCY)))
            sender.start()
            time.sleep(0.3)  # the stream is flowing before the first spend
            mixed = run_load(server.base_url, requests_for(mixed_spends), concurrency=args.spend_concurrency)
            sender.join()
        # the stream grants pack credits to its own customers only, so the spenders' balances move by their spends
        problems += (ledger_problems(url, mixed_spends, mixed, initial=before_mixed) + ledger_check_problems(url)
                     + ledger_mismatches(db.get_engine(url), workload))
        db.dispose_engines()
    emit(figure("spends_alone", alone, kind=args.database, concurrency=args.spend_concurrency))
    emit(figure("spends_during_webhooks", mixed, kind=args.database, concurrency=args.spend_concurrency))
    emit(figure("webhooks_during_spends", streamed["result"], kind=args.database, concurrency=STREAM_CONCURRENCY))
    emit({"benchmark": "mixed_load", "figure": "ledger_check", "database": args.database, "exact": not problems,
          "problems": problems[:10]})
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
