"""Webhook throughput: the full sidecar against a bare receiver, same events, same load, same run.

    .venv/bin/python bench/webhooks.py [--events 3000] [--mix both|pack|full] [--database sqlite|postgresql]
                                       [--database-url URL]
    .venv/bin/python bench/webhooks.py --workers 1,2,4 --database postgresql [--events 3000]

Both servers run as subprocesses under the same uvicorn settings (`python -m billing_core serve-webhooks`
and `bench/bare_receiver.py`; uvicorn picks uvloop and httptools for both when installed), each on a fresh
database, and get the same pre-signed deliveries over 16 keep-alive connections. Two mixes, each measured
against its own bare run: `pack` (pack purchases only, 10% redeliveries) and `full` (bench/stripe_mix.py:
subscriptions, renewals, packs, unhandled types, 10% redeliveries). Prints one JSON line per figure: each
receiver's events/s, p50/p99 latency and server CPU ms per event (from /proc/<pid>/stat), their ratio
(target >= 0.5 on SQLite, for both mixes; on PostgreSQL reported with no target), and the ledger check (every
balance and tier exact, every event applied once).

With `--workers 1,2,4` it measures the sidecar alone under `serve-webhooks --workers N` for each N (PostgreSQL
only), each on a fresh schema: events/s, latency, and the server's CPU per event summed over uvicorn's master
and its worker processes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (PYTHON, ROOT, Request, database, emit, free_port, machine, note, process_cpu_seconds,  # noqa: E402
                    run_load, running, sidecar_command, wait_for_workers)
from stripe_mix import (WEBHOOK_SECRET, build_pack_workload, build_workload, ledger_mismatches,  # noqa: E402
                        sidecar_environment, signed_deliveries)

WEBHOOK_PATH = "/api/stripe/webhook"
RATIO_TARGET = 0.5


def requests_for(signed: list[tuple[bytes, str]]) -> list[Request]:
    return [Request("POST", WEBHOOK_PATH, body, {"Content-Type": "application/json", "Stripe-Signature": header})
            for body, header in signed]


def warmup_requests(count: int) -> list[Request]:
    """Events of a type without a handler, so the warm-up leaves the ledger alone."""
    warm = build_workload(events=count * 4, seed=99, prefix="warm", duplicate_share=0)
    unknown = [e for e in warm.deliveries if e["type"] not in (
        "checkout.session.completed", "customer.subscription.created", "customer.subscription.updated",
        "invoice.paid", "invoice.payment_succeeded")][:count]
    return requests_for(signed_deliveries(unknown))


def figure(result, *, receiver: str, database_kind: str, events: int, concurrency: int, mix: str) -> dict:
    return {"benchmark": "webhooks", "mix": mix, "receiver": receiver, "database": database_kind, "events": events,
            "concurrency": concurrency, "events_per_s": round(result.rate, 1), "p50_ms": result.percentile_ms(50),
            "p99_ms": result.percentile_ms(99), "seconds": round(result.elapsed, 2),
            "server_cpu_ms_per_event": round(result.server_cpu / events * 1000, 2),
            "client_cpu_ms_per_event": round(result.client_cpu / events * 1000, 2),
            "statuses": result.status_counts()}


def bench_bare(requests: list[Request], warmup: list[Request], *, tmp: Path, concurrency: int, events: int,
               mix: str):
    port = free_port()
    env = {"BARE_DB": str(tmp / f"bare-{mix}.db"), "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    command = [PYTHON, str(ROOT / "bench" / "bare_receiver.py"), "--host", "127.0.0.1", "--port", str(port)]
    with running(command, env=env, log_path=tmp / "bare.log", port=port) as server:
        run_load(server.base_url, warmup, concurrency=concurrency)
        result = run_load(server.base_url, requests, concurrency=concurrency, server=server)
    return result, figure(result, receiver="bare", database_kind="sqlite", events=events, concurrency=concurrency,
                          mix=mix)


def bench_sidecar(requests: list[Request], warmup: list[Request], workload, *, tmp: Path, kind: str,
                  url: str | None, concurrency: int, events: int, mix: str):
    from billing_core import db

    directory = tmp / mix
    directory.mkdir(exist_ok=True)
    with database(kind, directory, url=url) as database_url:
        port = free_port()
        env = sidecar_environment(database_url)
        with running(sidecar_command(port), env=env, log_path=tmp / "sidecar.log", port=port) as server:
            run_load(server.base_url, warmup, concurrency=concurrency)
            result = run_load(server.base_url, requests, concurrency=concurrency, server=server)
        problems = ledger_mismatches(db.get_engine(database_url), workload)
        db.dispose_engines()
    found = figure(result, receiver="sidecar", database_kind=kind, events=events, concurrency=concurrency, mix=mix)
    return result, found, problems


MIXES = {"pack": build_pack_workload, "full": build_workload}


def bench_mix(mix: str, args, warmup: list[Request], tmp: Path) -> bool:
    """One mix: the bare receiver, then the sidecar, on the same deliveries; True when the ledger is exact."""
    workload = MIXES[mix](events=args.events, seed=args.seed)
    note(f"{mix} mix: {len(workload.deliveries)} deliveries ({workload.unique_events} distinct events, "
         f"{len(workload.customers)} customers); machine {machine()}")
    signed = signed_deliveries(workload.deliveries)
    bare_result, bare = bench_bare(requests_for(signed), warmup, tmp=tmp, concurrency=args.concurrency,
                                   events=len(workload.deliveries), mix=mix)
    emit(bare | {"machine": machine()})
    sidecar_result, sidecar, problems = bench_sidecar(
        requests_for(signed), warmup, workload, tmp=tmp, kind=args.database, url=args.database_url,
        concurrency=args.concurrency, events=len(workload.deliveries), mix=mix)
    emit(sidecar | {"machine": machine()})
    ratio = sidecar_result.rate / bare_result.rate if bare_result.rate else 0.0
    target = RATIO_TARGET if args.database == "sqlite" else None  # PostgreSQL's ratio is reported, not targeted
    emit({"benchmark": "webhooks", "mix": mix, "figure": "ratio_sidecar_to_bare", "database": args.database,
          "value": round(ratio, 3), "target": target, "met": None if target is None else ratio >= target})
    errors = {k: v for k, v in sidecar["statuses"].items() if k != "200"}
    emit({"benchmark": "webhooks", "mix": mix, "figure": "ledger_check", "database": args.database,
          "accounts": len(workload.customers), "distinct_events": workload.unique_events,
          "non_200_answers": errors, "exact": not problems and not errors, "problems": problems[:10]})
    return not problems and not errors


# --- serve-webhooks --workers N ------------------------------------------------------------------

def parse_worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: --workers takes whole numbers separated by commas, e.g. 1,2,4 (got {text!r})")
    if not counts or any(not 1 <= n <= 64 for n in counts):
        raise SystemExit(f"error: --workers takes counts from 1 to 64, e.g. 1,2,4 (got {text!r})")
    return counts


def bench_workers_once(requests: list[Request], warmup: list[Request], workload, *, workers: int, tmp: Path,
                       url: str | None, concurrency: int) -> dict:
    from billing_core import db

    with database("postgresql", tmp, url=url) as database_url:
        port = free_port()
        with running(sidecar_command(port, workers=workers), env=sidecar_environment(database_url),
                     log_path=tmp / f"sidecar-{workers}.log", port=port) as server:
            pids = [server.process.pid] + (wait_for_workers(server.process.pid, workers) if workers > 1 else [])
            run_load(server.base_url, warmup, concurrency=concurrency)
            cpu_before = sum(process_cpu_seconds(pid) for pid in pids)
            result = run_load(server.base_url, requests, concurrency=concurrency)
            server_cpu = sum(process_cpu_seconds(pid) for pid in pids) - cpu_before
        problems = ledger_mismatches(db.get_engine(database_url), workload)
        db.dispose_engines()
    events = len(requests)
    return {"benchmark": "webhooks_workers", "database": "postgresql", "workers": workers, "events": events,
            "concurrency": concurrency, "events_per_s": round(result.rate, 1), "p50_ms": result.percentile_ms(50),
            "p99_ms": result.percentile_ms(99), "seconds": round(result.elapsed, 2),
            "server_cpu_ms_per_event": round(server_cpu / events * 1000, 2),
            "statuses": result.status_counts(), "exact": not problems, "problems": problems[:5]}


def bench_workers(counts: list[int], *, events: int, seed: int, url: str | None, concurrency: int) -> int:
    workload = build_workload(events=events, seed=seed)
    note(f"workers {counts}: {len(workload.deliveries)} deliveries ({workload.unique_events} distinct events) "
         f"each; machine {machine()}")
    warmup = warmup_requests(100)
    exact = True
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp_name:
        for workers in counts:
            found = bench_workers_once(requests_for(signed_deliveries(workload.deliveries)), warmup, workload,
                                       workers=workers, tmp=Path(tmp_name), url=url, concurrency=concurrency)
            emit(found | {"machine": machine()})
            exact = exact and found["exact"] and set(found["statuses"]) == {"200"}
    return 0 if exact else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000, help="deliveries per receiver and mix (default 3000)")
    parser.add_argument("--mix", choices=("both", *MIXES), default="both",
                        help="pack: pack purchases only; full: the realistic mix; both (default)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the sidecar's database (the bare receiver always stores in SQLite)")
    parser.add_argument("--database-url", help="PostgreSQL server to use (default TEST_DATABASE_URL or "
                                               "postgresql://postgres@127.0.0.1:5432/test); a fresh schema is made")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", help="e.g. 1,2,4: measure the sidecar under serve-webhooks --workers N for "
                                          "each N instead of against the bare receiver (PostgreSQL only)")
    args = parser.parse_args(argv)
    if args.database_url and args.database_url.startswith("postgres"):
        args.database = "postgresql"  # a PostgreSQL URL means PostgreSQL
    if args.workers:
        if args.database != "postgresql":
            parser.error("--workers needs --database postgresql: SQLite runs one worker")
        return bench_workers(parse_worker_counts(args.workers), events=args.events, seed=args.seed,
                             url=args.database_url, concurrency=args.concurrency)

    exact = True
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp_name:
        tmp = Path(tmp_name)
        warmup = warmup_requests(100)
        for mix in (MIXES if args.mix == "both" else (args.mix,)):
            exact = bench_mix(mix, args, warmup, tmp) and exact
    return 0 if exact else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
