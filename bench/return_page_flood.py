"""A flood of return-page requests (/checkout/success) against a slow Stripe while the credits API is used.

    .venv/bin/python bench/return_page_flood.py [--pages 2000] [--spends 1000] [--stripe-latency 2.0]
                                               [--database sqlite|postgresql] [--database-url URL]

The sidecar runs as a subprocess (`serve-webhooks`) with STRIPE_API_BASE pointed at the Stripe double
(tests/stripe_double.py) answering every request after --stripe-latency seconds. First the spends alone
(16 keep-alive callers, the baseline), then the same spends while 64 callers send return-page requests for
distinct, unknown checkout sessions. Figures: spend p50/p99 with and without the flood, return-page
p50/p99/max, their statuses, and how many requests reached Stripe. One JSON line per figure.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import Request, database, emit, free_port, machine, note, run_load, running, sidecar_command  # noqa: E402
from stripe_mix import API_TOKEN, SECRET_KEY, sidecar_environment  # noqa: E402

ACCOUNTS = 50


def seed(url: str) -> list[str]:
    from billing_core import db, ledger

    users = [f"flood_user_{n:03d}" for n in range(ACCOUNTS)]
    with db.write_session(db.get_engine(url)) as session:
        for user_id in users:
            ledger.grant_pack(session, user_id=user_id, credits=100_000, source_key=f"bench-grant:{user_id}")
    db.dispose_engines()
    return users


def spend_requests(users: list[str], count: int, tag: str) -> list[Request]:
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    return [Request("POST", f"/api/accounts/{users[i % len(users)]}/consume",
                    f'{{"credits": 1, "reference": "{tag}-{i}"}}'.encode(), headers) for i in range(count)]


def page_requests(count: int) -> list[Request]:
    return [Request("GET", f"/checkout/success?session_id=cs_test_flood_{i:06d}", b"") for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--spends", type=int, default=1000)
    parser.add_argument("--stripe-latency", type=float, default=2.0)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--database-url")
    args = parser.parse_args()

    from stripe_double import StripeServer, StripeState

    state = StripeState(api_key=SECRET_KEY)
    state.latency = args.stripe_latency
    with tempfile.TemporaryDirectory() as directory, database(args.database, Path(directory),
                                                             url=args.database_url) as url, \
            StripeServer(state) as stripe:
        users = seed(url)
        port = free_port()
        env = {**sidecar_environment(url), "STRIPE_API_BASE": stripe.url}
        with running(sidecar_command(port), env=env, log_path=Path(directory) / "sidecar.log", port=port) as server:
            run_load(server.base_url, spend_requests(users, 200, "warm"))
            note("spends alone ...")
            alone = run_load(server.base_url, spend_requests(users, args.spends, "alone"), server=server)
            note(f"spends during a flood of {args.pages} return pages (Stripe answers after {args.stripe_latency}s) ...")
            flood: dict = {}
            flooder = threading.Thread(target=lambda: flood.update(
                result=run_load(server.base_url, page_requests(args.pages), concurrency=64)))
            flooder.start()
            during = run_load(server.base_url, spend_requests(users, args.spends, "flood"), server=server)
            flooder.join()
            pages = flood["result"]
    reached_stripe = sum(1 for r in state.requests if r.path.startswith("/v1/checkout/sessions/"))
    common = {"database": args.database, **machine()}
    emit({"figure": "spend_latency_alone", "p50_ms": alone.percentile_ms(50), "p99_ms": alone.percentile_ms(99),
          "rate_per_s": round(alone.rate, 1), "statuses": alone.status_counts(), **common})
    emit({"figure": "spend_latency_during_return_page_flood", "p50_ms": during.percentile_ms(50),
          "p99_ms": during.percentile_ms(99), "rate_per_s": round(during.rate, 1), "statuses": during.status_counts(),
          **common})
    emit({"figure": "return_page_during_flood", "requests": len(pages.statuses), "p50_ms": pages.percentile_ms(50),
          "p99_ms": pages.percentile_ms(99), "max_ms": pages.percentile_ms(100), "statuses": pages.status_counts(),
          "stripe_latency_s": args.stripe_latency, "requests_reaching_stripe": reached_stripe, **common})
    answered = all(status in (200, 404) for status in pages.statuses)
    spent = all(status == 200 for status in alone.statuses + during.statuses)
    return 0 if answered and spent else 1


if __name__ == "__main__":
    sys.exit(main())
