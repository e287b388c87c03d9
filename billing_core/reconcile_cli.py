"""`python -m billing_core reconcile [--since 3d] [--json]`.

Exit code 0 when nothing needs attention, 3 when the report lists problems, 1 for a refusal or error.
The progress bar goes to stderr, and only when stderr is a terminal; `--json` prints one JSON object.
"""
from __future__ import annotations

import json
import sys

from . import db
from .reconcile import ReconcileReport, check_since, reconcile
from .settings import get_settings

EXIT_PROBLEMS_FOUND = 3


class ProgressBar:
    """One line on stderr, redrawn in place; silent when stderr is not a terminal."""

    WIDTH = 30

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = False

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if total:
            filled = self.WIDTH * done // total
            line = f"{stage} events [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total}"
        else:
            line = f"{stage} events from Stripe: {done}"
        self.stream.write("\r" + line.ljust(70))
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\r" + " " * 70 + "\r")
            self.stream.flush()


def format_report(report: ReconcileReport) -> str:
    data = report.as_dict()
    counts = data["events"]
    lines = [f"Stripe events from {data['since']} to {data['until']}: {counts['seen']} seen, "
             f"{counts['already_stored']} already stored, {counts['recovered']} recovered"
             + (f", {counts['arrived_meanwhile']} arrived by webhook meanwhile" if counts["arrived_meanwhile"] else "")
             + (f", {counts['failed']} failed" if counts["failed"] else "")]
    for row in data["recovered"]:
        lines.append(f"  recovered {row['id']} {row['type']} -> {row['status']}"
                     + (f" (user {row['user_id']})" if row.get("user_id") else ""))
    sections = [
        ("events that could not be recovered", data["recovery_errors"],
         lambda r: f"{r['id']} {r['type']}: {r['error']}"),
        ("stored events that failed or need attention (`replay --failed`; `replay EVENT_ID --user USER_ID`)",
         data["stored_needing_attention"], lambda r: f"{r['id']} {r['type']} [{r['status']}] {r['error']}"),
        ("paid Checkout Sessions without their grant", data["paid_sessions_without_grant"],
         lambda r: f"{r['session_id']} user {r['user_id'] or '?'} (event {r['event_id']})"),
        ("paid subscription invoices without their grant", data["paid_invoices_without_grant"],
         lambda r: f"{r['invoice_id']} {r['billing_reason']} {r['subscription_id'] or '?'} "
                   f"user {r['user_id'] or '?'} (event {r['event_id']})"),
        ("grants without a paid payment", data["grants_without_payment"],
         lambda r: f"entry {r['entry_id']} {r['kind']} {r['credits']} credits to {r['user_id']} "
                   f"({r['source_key']}; payment {r['payment_status'] or 'none'})"),
        ("applied twice", data["applied_twice"],
         lambda r: f"{r['what']}: user {r['user_id']}, {r['credits']} credits "
                   + ", ".join(f"{k} {r[k]}" for k in ("payment_id", "subscription_id", "period_end") if r.get(k))),
        ("credit lots and account totals that don't match their entries (`check-ledger`)", data["ledger_mismatches"],
         lambda r: f"{r['what']} of {r['user_id']} {r.get('lot_key') or r.get('source_key') or ''}: {r['problem']}"),
    ]
    for title, rows, describe in sections:
        lines.append(f"{title}: {len(rows)}")
        lines.extend(f"  {describe(row)}" for row in rows)
    lines.append("nothing needs attention" if report.problems == 0 else f"{report.problems} problem(s) need attention")
    return "\n".join(lines)


def cmd_reconcile(args) -> int:
    settings = get_settings()
    since = check_since(args.since)
    db.ensure_schema_current(settings.database_url)
    progress = ProgressBar()
    try:
        report = reconcile(since=since, settings=settings, engine=db.get_engine(settings.database_url),
                           progress=progress)
    finally:
        progress.finish()
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), sort_keys=True, default=str) + "\n")
    else:
        print(format_report(report))
    return 0 if report.problems == 0 else EXIT_PROBLEMS_FOUND


def register(sub) -> None:
    p = sub.add_parser("reconcile", help="recover events the webhooks missed and report what doesn't add up",
                       description="Store and process every Stripe event of the period that the database doesn't "
                                   "have (the same idempotent path as the webhook), then report missing grants, "
                                   "grants without a payment, anything applied twice and credit lots or account "
                                   "totals that don't match the ledger entries. Safe to repeat and to "
                                   "run while the sidecar is receiving. Exit code 0: nothing needs attention; "
                                   "3: problems listed; 1: refused or failed.")
    p.add_argument("--since", default="3d", help="how far back, at most 30d (Stripe keeps events 30 days): "
                                                 "e.g. 30m, 12h, 3d (default 3d)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_reconcile)
