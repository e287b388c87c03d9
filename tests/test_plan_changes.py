"""billing_core.plan_changes on the real databases: each change once whichever report comes first, top-ups only
when paid, take-backs at once and never beyond unspent subscription credits, completed when late credits arrive."""
import itertools

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from billing_core import db, ledger, plan_changes
from billing_core.catalog import CATALOG, allowance
from billing_core.models import Payment
from billing_core.proration import fraction_at, round_half_up

DAY = 86400
START = 1_900_000_000
END = START + 30 * DAY
_accounts = itertools.count(1)


def plan_of(price_to_plan):
    return lambda line: CATALOG[price_to_plan[line["price"]]]


def line(tier, amount, changed_at):
    return {"amount": amount, "quantity": 1, "price": tier, "proration": True,
            "period": {"start": changed_at, "end": END}}


def proration_invoice(invoice_id, old, new, changed_at):
    left = (END - changed_at) / (END - START)
    return {"id": invoice_id, "lines": {"data": [
        line(old, -round(CATALOG[old].amount_cents * left), changed_at),
        line(new, round(CATALOG[new].amount_cents * left), changed_at)]}}


class Account:
    """One user's subscription period on the real database, with helpers to report changes."""

    def __init__(self, tier="starter", base=True):
        number = next(_accounts)
        self.user_id, self.sub, self.payments = f"agent-pc-{number}", f"sub_pc_{number}", {}
        with db.write_session() as session:
            ledger.lock_account(session, user_id=self.user_id)
        if base:
            self.pay_base(tier)

    def pay_base(self, tier):
        with db.write_session() as session:
            ledger.grant_subscription_period(session, user_id=self.user_id, subscription_id=self.sub, period_end=END,
                                             tier=tier, source_key=f"base:{self.sub}")
            plan_changes.settle_takebacks(session, user_id=self.user_id, subscription_id=self.sub, period_end=END)

    def payment(self, session, invoice_id):
        if invoice_id not in self.payments:
            payment = Payment(user_id=self.user_id, source="invoice", invoice_id=f"{self.sub}:{invoice_id}", subscription_id=self.sub,
                              kind="plan", amount_cents=100, status="paid")
            session.add(payment)
            session.flush()
            self.payments[invoice_id] = payment.id
        return self.payments[invoice_id]

    def event(self, event_id, old, new, changed_at, *, period_start=START):
        with db.write_session() as session:
            ledger.lock_account(session, user_id=self.user_id)
            plan_changes.note_subscription_update(
                session, user_id=self.user_id, subscription_id=self.sub, event_id=f"{self.sub}:{event_id}", changed_at=changed_at,
                old_tier=old, new_tier=new, period_start=period_start, period_end=END, old_period_end=END)

    def invoice(self, invoice_id, old, new, changed_at, *, period_start=START, paid=True):
        invoice = proration_invoice(invoice_id, old, new, changed_at)
        invoice["id"] = f"{self.sub}:{invoice_id}"
        with db.write_session() as session:
            ledger.lock_account(session, user_id=self.user_id)
            plan_changes.note_invoice(session, user_id=self.user_id, subscription_id=self.sub, invoice=invoice,
                                      payment_id=self.payment(session, invoice_id) if paid else None,
                                      plan_of_line=plan_of({t: t for t in CATALOG}),
                                      known_period=(period_start, END) if period_start else None,
                                      paid_through=None)

    def balance(self):
        with db.read_session() as session:
            return ledger.balance(session, self.user_id, now=ledger.from_epoch(START + DAY))

    def changes(self):
        with db.read_session() as session:
            return plan_changes.period_changes(session, subscription_id=self.sub, period_end=END)


def test_upgrade_on_day_10_then_downgrade_on_day_20_the_worked_example(database_url):
    account = Account()
    account.event("evt_up", "starter", "business", START + 10 * DAY)
    assert account.balance() == 100  # the tier changed; no money yet, no credits
    account.invoice("in_up", "starter", "business", START + 10 * DAY)
    assert account.balance() == 100 + 1267
    account.event("evt_down", "business", "starter", START + 20 * DAY)
    assert account.balance() == 100 + 1267 - 633 == 734
    account.invoice("in_down", "business", "starter", START + 20 * DAY)
    assert account.balance() == 734
    up, down = account.changes()
    assert (up.credits, up.applied, up.fraction, up.event_id, up.invoice_id) == (1267, 1267, "2/3", f"{account.sub}:evt_up",
                                                                       f"{account.sub}:in_up")
    assert (down.credits, down.applied, down.fraction) == (-633, -633, "1/3")


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_starter_business_starter_within_a_minute_in_every_order_leaves_the_balance_where_it_was(sqlite_url, order):
    account = Account()
    at = START + 12 * DAY + 3600
    reports = [lambda: account.event("evt_up", "starter", "business", at),
               lambda: account.invoice("in_up", "starter", "business", at),
               lambda: account.event("evt_down", "business", "starter", at + 40),
               lambda: account.invoice("in_down", "business", "starter", at + 40)]
    for index in order:
        reports[index]()
    for report in reports:  # redeliveries change nothing
        report()
    assert abs(account.balance() - 100) <= 1
    assert [c.event_id for c in account.changes()] == [f"{account.sub}:evt_up", f"{account.sub}:evt_down"]
    assert [c.invoice_id for c in account.changes()] == [f"{account.sub}:in_up", f"{account.sub}:in_down"]


@pytest.mark.parametrize("percent, expected", [(0, 1900), (50, 950), (99, 19)])
def test_upgrade_at_0_50_and_99_percent_of_the_period(database_url, percent, expected):
    account = Account()
    at = START + 30 * DAY * percent // 100
    account.invoice("in_up", "starter", "business", at, period_start=None)  # from the amounts alone
    account.event("evt_up", "starter", "business", at)
    assert account.balance() == 100 + expected


def test_an_unpaid_proration_grants_nothing_until_its_invoice_is_paid(database_url):
    account = Account()
    account.invoice("in_up", "starter", "professional", START + 15 * DAY, paid=False)
    account.event("evt_up", "starter", "professional", START + 15 * DAY)
    assert account.balance() == 100
    account.invoice("in_up", "starter", "professional", START + 15 * DAY)
    assert account.balance() == 100 + 200


def test_a_take_back_never_touches_spent_or_pack_credits(database_url):
    account = Account(tier="business")
    with db.write_session() as session:
        ledger.grant_pack(session, user_id=account.user_id, credits=500, source_key="pack:pc")
        ledger.consume(session, user_id=account.user_id, credits=1800, reference="run-1",
                       now=ledger.from_epoch(START + DAY))
    account.event("evt_down", "business", "starter", START + 3 * DAY)  # wants round(1900 x 27/30) = 1710
    assert account.balance() == 200 + 500 - 200  # only the 200 unspent subscription credits; packs stay
    [down] = account.changes()
    assert (down.credits, down.applied) == (-1710, -200)


def test_a_downgrade_before_the_base_invoice_takes_back_when_the_base_arrives(database_url):
    account = Account(tier="business", base=False)
    account.event("evt_down", "business", "starter", START + 10 * DAY)
    assert account.balance() == 0
    account.pay_base("business")
    assert account.balance() == 2000 - 1267


def test_a_take_back_short_only_because_the_upgrade_was_late_is_completed_by_it(database_url):
    account = Account()
    account.event("evt_up", "starter", "business", START + 10 * DAY)
    account.event("evt_down", "business", "starter", START + 20 * DAY)
    assert account.balance() == 0  # took the 100 there were
    account.invoice("in_up", "starter", "business", START + 10 * DAY)
    assert account.balance() == 734


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_changes_grant_the_formula_and_never_exceed_the_highest_allowance(sqlite_url, data):
    tiers = ("starter", "professional", "business")
    base = data.draw(st.sampled_from(tiers))
    moments = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=30 * DAY - 1), min_size=1, max_size=5,
                                        unique=True)))
    path = [base]
    for _ in moments:
        path.append(data.draw(st.sampled_from([t for t in tiers if t != path[-1]])))
    account = Account(tier=base)
    reports, expected = [], allowance(base)
    for number, (moment, old, new) in enumerate(zip(moments, path, path[1:])):
        at = START + moment
        fraction = fraction_at(changed_at=at, period_start=START, period_end=END)
        expected += round_half_up((allowance(new) - allowance(old)) * fraction)
        reports.append(lambda e=f"evt_{number}", o=old, n=new, t=at: account.event(e, o, n, t))
        reports.append(lambda i=f"in_{number}", o=old, n=new, t=at: account.invoice(i, o, n, t))
    for report in data.draw(st.permutations(reports)):
        report()
    assert account.balance() == expected <= allowance("business")


def test_back_and_forth_in_one_period_is_not_reported_as_granted_twice(database_url):
    from billing_core.reconcile import applied_twice

    account = Account()
    for number, at in enumerate((START + DAY, START + 2 * DAY, START + 3 * DAY)):
        account.event(f"evt_up{number}", "starter", "business", at)
        account.invoice(f"in_up{number}", "starter", "business", at)
        account.event(f"evt_down{number}", "business", "starter", at + 3600)
    with db.read_session() as session:
        assert [row for row in applied_twice(session) if row.get("user_id") == account.user_id] == []
        assert sum(e.credits for e in ledger.history(session, account.user_id, limit=100)
                   if e.kind == "upgrade_topup") > allowance("business")
