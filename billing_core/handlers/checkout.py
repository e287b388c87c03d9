"""Checkout Sessions: a paid pack grants once; a subscription checkout maps its subscription to the user."""
from __future__ import annotations

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from .. import ledger
from ..catalog import CatalogItem, UnknownItem, allowance, find_item_for_price, get_item
from ..checkout import mark_link_status
from ..models import CheckoutLink, Payment, Subscription, utcnow
from ..prepared import Prepared
from ..settings import Settings
from ..stripe_payloads import (NeedsAttention, as_amount, as_currency, checkout_email, checkout_explicit_user,
                               checkout_line_prices, id_of, metadata_item, metadata_user, moment_of, required_id)
from .common import (SETTLED_PAYMENT_STATUSES, EventContext, Handled, apply_earlier_reversals, ensure_account,
                     ensure_account_state, user_for_customer)

PAID_CHECKOUT = ("paid", "no_payment_required")

# The common case, a paid session seen for the first time, in Core statements built once: the payment is
# inserted already paid with the pack's credits (a new payment has no earlier refund or dispute to apply),
# and an issued link is completed by one UPDATE.
_PAYMENT = Payment.__table__
_LINK = CheckoutLink.__table__


def _insert_new_payment_statement(dialect: str):
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return (insert(_PAYMENT).on_conflict_do_nothing(index_elements=["checkout_session_id"])
            .returning(_PAYMENT.c.id))


_INSERT_NEW_PAYMENT = {name: Prepared(_insert_new_payment_statement(name)) for name in ("sqlite", "postgresql")}
_COMPLETE_LINK = Prepared(update(_LINK).where(_LINK.c.session_id == bindparam("link_session_id"), _LINK.c.status != "complete")
                  .values(status="complete", completed_at=bindparam("now")))
_INSERT_NEW_SUBSCRIPTION = {
    name: Prepared(insert(Subscription.__table__).on_conflict_do_nothing(index_elements=["id"]))
    for name, insert in (("sqlite", sqlite_insert), ("postgresql", pg_insert))}
_UNGRANTED = Prepared(update(_PAYMENT).where(_PAYMENT.c.id == bindparam("payment_id")).values(credits_granted=0))


def _link_for(session: Session, session_id: str) -> CheckoutLink | None:
    return session.execute(select(CheckoutLink).where(CheckoutLink.session_id == session_id)).scalars().first()


def checkout_item(session: Session, checkout_session: dict, settings: Settings) -> CatalogItem | None:
    key = metadata_item(checkout_session)
    if key:
        try:
            return get_item(key)
        except UnknownItem:
            raise NeedsAttention(f"checkout session names unknown item {key!r}") from None
    for price_id in checkout_line_prices(checkout_session):
        item = find_item_for_price(price_id, settings)
        if item:
            return item
    link = _link_for(session, checkout_session["id"])
    return get_item(link.item) if link else None


def checkout_user(session: Session, checkout_session: dict, assigned_user_id: str | None) -> str:
    explicit = checkout_explicit_user(checkout_session)
    if explicit or assigned_user_id:
        return explicit or assigned_user_id
    link = _link_for(session, checkout_session["id"])
    if link:
        return link.user_id
    user_id = user_for_customer(session, id_of(checkout_session.get("customer")))
    if user_id:
        return user_id
    raise NeedsAttention(f"can't tell which user checkout session {checkout_session['id']} belongs to "
                         "(no metadata.user_id or client_reference_id); assign the user and reprocess")


def _checkout_payment(session: Session, checkout_session: dict, *, user_id: str, item: CatalogItem) -> Payment:
    session_id = checkout_session["id"]
    payment = session.execute(select(Payment).where(Payment.checkout_session_id == session_id)).scalars().first()
    if payment is None:
        payment = Payment(user_id=user_id, source="checkout", checkout_session_id=session_id, item=item.key,
                          kind=item.kind, status="unpaid",
                          amount_cents=as_amount(checkout_session.get("amount_total"), what="amount_total"),
                          currency=as_currency(checkout_session.get("currency"), default=item.currency),
                          created_at=moment_of(checkout_session.get("created"), what="checkout session created"))
    payment.payment_intent_id = payment.payment_intent_id or id_of(checkout_session.get("payment_intent"))
    payment.updated_at = utcnow()
    session.add(payment)
    session.flush()
    return payment


def fulfil_checkout_session(session: Session, checkout_session: dict, *, settings: Settings,
                            assigned_user_id: str | None = None) -> Handled:
    """Apply a Checkout Session: link the customer, record the payment, grant a paid pack once.

    The webhook and the success page both call this; the grant's source key `checkout:{session id}`
    makes the second caller a no-op.
    """
    session_id = required_id(checkout_session, "cs_", "checkout session")
    user_id = checkout_user(session, checkout_session, assigned_user_id)
    account = ensure_account_state(session, user_id=user_id, email=checkout_email(checkout_session),
                                   stripe_customer_id=id_of(checkout_session.get("customer")))
    user_id = account.user_id
    mode = checkout_session.get("mode")
    if mode == "payment":
        _fulfil_payment(session, checkout_session, user_id=user_id, settings=settings, account=account)
    elif mode == "subscription":
        _link_subscription(session, checkout_session, user_id=user_id, settings=settings)
    else:
        return Handled(user_id=user_id, ignored=True, note=f"checkout mode {mode!r} grants nothing")
    if checkout_session.get("status") == "complete":  # open or expired -> complete; one statement
        _COMPLETE_LINK.run(session.connection(), {"link_session_id": session_id, "now": utcnow()})
    return Handled(user_id=user_id)


def _fulfil_payment(session: Session, checkout_session: dict, *, user_id: str, settings: Settings,
                    account=None) -> None:
    item = checkout_item(session, checkout_session, settings)
    if item is None or item.kind != "pack":
        what = "no item" if item is None else f"plan {item.key} in payment mode"
        raise NeedsAttention(f"checkout session {checkout_session['id']} names {what}; can't tell which pack "
                             "was bought")
    paid = checkout_session.get("payment_status") in PAID_CHECKOUT
    if paid and _grant_new_payment(session, checkout_session, user_id=user_id, item=item, account=account):
        return
    payment = _checkout_payment(session, checkout_session, user_id=user_id, item=item)
    if not paid:
        return  # unpaid (delayed payment method): the async_payment_succeeded event grants
    if payment.status not in SETTLED_PAYMENT_STATUSES:
        payment.status = "paid"
    entry = ledger.grant_pack(session, user_id=user_id, credits=item.credits,
                              source_key=f"checkout:{checkout_session['id']}", payment_id=payment.id)
    if entry is not None:
        payment.credits_granted += entry.credits
    session.add(payment)
    session.flush()
    apply_earlier_reversals(session, payment)


def _grant_new_payment(session: Session, checkout_session: dict, *, user_id: str, item: CatalogItem,
                       account=None) -> bool:
    """Record a paid session's payment and grant its pack, when the session is new; False when its payment
    was recorded before (the success page, an unpaid first event), which the general path then updates."""
    connection = session.connection()
    now = utcnow()
    payment_id = _INSERT_NEW_PAYMENT[connection.dialect.name].scalar(connection, {
        "user_id": user_id, "source": "checkout", "checkout_session_id": checkout_session["id"], "invoice_id": None,
        "payment_intent_id": id_of(checkout_session.get("payment_intent")), "charge_id": None,
        "subscription_id": None, "item": item.key, "kind": item.kind, "status": "paid",
        "amount_cents": as_amount(checkout_session.get("amount_total"), what="amount_total"),
        "currency": as_currency(checkout_session.get("currency"), default=item.currency),
        "amount_refunded": 0, "amount_disputed_lost": 0, "credits_granted": item.credits,
        "created_at": moment_of(checkout_session.get("created"), what="checkout session created"), "updated_at": now,
    })
    if payment_id is None:
        return False
    granted = ledger.grant_pack_once(session, user_id=user_id, credits=item.credits,
                                     source_key=f"checkout:{checkout_session['id']}", payment_id=payment_id,
                                     account_state=account)
    if not granted:  # the grant was there before its payment (an operator's repair): this payment granted nothing
        _UNGRANTED.run(connection, {"payment_id": payment_id})
    return True


def _link_subscription(session: Session, checkout_session: dict, *, user_id: str, settings: Settings) -> None:
    """A subscription checkout grants nothing itself (its first invoice does); it maps the subscription
    to the user without touching state that a subscription event already brought (one INSERT that does
    nothing when the subscription is there)."""
    subscription_id = id_of(checkout_session.get("subscription"))
    if not subscription_id:
        return
    key = metadata_item(checkout_session)
    tier = key if key and allowance(key) > 0 else "none"
    connection = session.connection()
    now = utcnow()
    _INSERT_NEW_SUBSCRIPTION[connection.dialect.name].run(connection, {
        "id": subscription_id, "user_id": user_id, "tier": tier, "price_id": settings.price_id(tier) or None,
        "status": "incomplete", "current_period_end": None, "current_period_start": None,
        "cancel_at_period_end": False, "state_at": 0, "created_at": now, "updated_at": now})


def on_checkout_completed(session: Session, ctx: EventContext) -> Handled:
    return fulfil_checkout_session(session, ctx.obj, settings=ctx.settings, assigned_user_id=ctx.assigned_user_id)


def on_checkout_async_failed(session: Session, ctx: EventContext) -> Handled:
    checkout_session = ctx.obj
    required_id(checkout_session, "cs_", "checkout session")
    user_id = checkout_user(session, checkout_session, ctx.assigned_user_id)
    ensure_account(session, user_id=user_id, stripe_customer_id=id_of(checkout_session.get("customer")))
    item = checkout_item(session, checkout_session, ctx.settings)
    if item is None:
        raise NeedsAttention(f"checkout session {checkout_session['id']} names no item")
    payment = _checkout_payment(session, checkout_session, user_id=user_id, item=item)
    if payment.status == "unpaid":
        payment.status = "failed"
        session.add(payment)
        session.flush()
    return Handled(user_id=user_id)


def on_checkout_expired(session: Session, ctx: EventContext) -> Handled:
    session_id = required_id(ctx.obj, "cs_", "checkout session")
    mark_link_status(session, session_id=session_id, status="expired")
    link = session.execute(select(CheckoutLink.user_id).where(CheckoutLink.session_id == session_id)).scalar()
    return Handled(user_id=link or metadata_user(ctx.obj))
