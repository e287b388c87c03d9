"""A strict, in-memory Stripe test double, shared by every test that talks to Stripe.

Two ways in, one state:

* ``FakeHTTPClient(state)`` is a ``stripe.HTTPClient``: give it to ``stripe.StripeClient(http_client=...)``
  (or to ``billing_core.stripe_client.make_stripe_client(settings, http_client=...)``) and every request is
  answered from ``state`` without a socket. Retries don't sleep.
* ``StripeServer(state)`` is a small Stripe-compatible HTTP server on 127.0.0.1 (random port, threaded);
  point ``STRIPE_API_BASE`` at ``server.url`` and any process (the CLI as a subprocess, the sidecar) reaches it.

``StripeState`` is the fake Stripe account. It is as strict as Stripe where our code could go wrong:

* every request needs ``Authorization: Bearer <key>``; a missing or unknown key answers 401
  (``StripeState(api_key="sk_test_...")`` accepts only that key; by default any ``sk_test_``/``sk_live_``/
  ``rk_test_``/``rk_live_`` key is accepted and sets ``livemode`` of the objects it creates);
* bodies are form-encoded like Stripe's (``line_items[0][price]=...``, ``metadata[user_id]=...``); an unknown
  parameter answers 400 ``invalid_request_error`` naming it (``param`` = e.g. ``line_items[0][foo]``);
* a reused ``Idempotency-Key`` with different parameters (or another endpoint) answers 400
  ``idempotency_error``; the same key with the same parameters replays the first (2xx) response unchanged;
* Checkout Sessions: ``customer`` together with ``customer_email`` -> 400; an unknown price -> 400
  ``resource_missing`` on ``line_items[0][price]``; an inactive price -> 400; a recurring price in
  ``payment`` mode (or a one-time price in ``subscription`` mode) -> 400; ``customer_creation`` outside
  ``payment`` mode or with ``customer`` -> 400; ``subscription_data`` outside subscription mode and
  ``payment_intent_data`` outside payment mode -> 400; ``expires_at`` less than 30 minutes or more than
  24 hours after now -> 400; an unknown customer -> 400 ``resource_missing``.
* Prices: a ``lookup_key`` already used by another price -> 400 unless ``transfer_lookup_key=true``.

Endpoints (all under /v1): checkout/sessions (create, retrieve, list), checkout/sessions/{id}/line_items,
checkout/sessions/{id}/expire (open sessions only, else 400),
billing_portal/sessions (create; ``configuration`` must exist and be active, else Stripe's default
configuration), billing_portal/configurations (create, list with ``active``/``is_default``, retrieve, update;
products and prices must exist, belong together and be active recurring prices), products (create, list, retrieve, update), prices (create, list with
``lookup_keys[]``/``active``/``product``/``type``, retrieve, update), customers (create, retrieve),
invoice_payments (list, filter ``invoice`` or ``payment[type]=payment_intent&payment[payment_intent]=``),
events (list with ``limit``/``starting_after``/``ending_before``/``created[gte|gt|lte|lt]``/``type``/
``types[]``, newest first, ``has_more``; retrieve), and retrieve for charges, payment_intents, invoices,
subscriptions, disputes and refunds; subscriptions/{id} (DELETE: cancel; a canceled one -> 400) and refunds
(create by ``payment_intent`` or ``charge``; nothing left to refund -> 400 ``charge_already_refunded``).
``expand[]`` is accepted everywhere; ``product`` on prices and
``line_items`` on checkout sessions are really expanded, other expansions are ignored.

Test-side API (all return the stored dict; objects are plain dicts shaped like the current API):

* ``state.add_product(...)``, ``state.add_price(...)``, ``state.seed_catalog(items) -> {item_key: price_id}``
* ``state.add_customer(id=None, email=None, ...)``
* ``state.add_portal_configuration(features=None, metadata=None, is_default=False, active=True)``
* ``state.add_checkout_session(**fields)``; ``state.complete_checkout_session(id, payment_status="paid",
  customer=None, payment_intent=None, subscription=None, invoice=None)``; ``state.expire_checkout_session(id)``
* ``state.add_invoice_payment(invoice=, payment_intent=, amount_paid=, currency="usd", status="paid")``
* ``state.add_object(kind, obj)`` for charges, payment_intents, invoices, subscriptions, disputes, refunds
  (``state.add_charge(...)`` is a shortcut)
* ``state.add_event(type, data_object, *, id=None, created=None, api_version=None, livemode=None,
  previous_attributes=None) -> event``
* ``state.fail_next(status=429, type="rate_limit_error", message=..., code=None, times=1)`` or
  ``state.fail_next(connection_error=True)``: the next request(s) fail before being handled
* ``state.now`` (a callable, default ``time.time``) is the fake clock for ``created`` and ``expires_at`` checks
* ``state.requests``: every request received (``Request``: method, path, params (decoded, nested),
  headers (lower-case names), idempotency_key, status); ``state.requests_to("POST", "/v1/checkout/sessions")``
* ``state.objects[kind][id]``: everything stored, by kind ("checkout_sessions", "prices", "products", ...)
"""
from __future__ import annotations

import json
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import stripe

API_VERSION = "2026-10-28.endive"
KEY_PREFIXES = ("sk_test_", "sk_live_", "rk_test_", "rk_live_")

# --- parameter schemas --------------------------------------------------------------------
# A schema is a dict of allowed names. Leaves: str, int, bool, METADATA (string map), ANY (anything),
# a tuple of allowed strings (enum), a nested dict, or [schema] (an indexed array).
METADATA = "metadata"
ANY = "any"
EXPAND = {"expand": [str]}
LIST = {"limit": int, "starting_after": str, "ending_before": str, **EXPAND}
CREATED_RANGE = {"gt": int, "gte": int, "lt": int, "lte": int}

SESSION_CREATE = {
    "mode": ("payment", "subscription", "setup"),
    "line_items": [{"price": str, "quantity": int, "adjustable_quantity": ANY, "tax_rates": [str]}],
    "client_reference_id": str,
    "metadata": METADATA,
    "customer": str,
    "customer_email": str,
    "customer_creation": ("always", "if_required"),
    "customer_update": ANY,
    "success_url": str,
    "cancel_url": str,
    "return_url": str,
    "ui_mode": ("hosted", "embedded", "custom"),
    "expires_at": int,
    "subscription_data": {"metadata": METADATA, "description": str, "trial_period_days": int},
    "payment_intent_data": {"metadata": METADATA, "description": str, "receipt_email": str,
                            "setup_future_usage": ("on_session", "off_session"), "statement_descriptor": str},
    "allow_promotion_codes": bool,
    "billing_address_collection": ("auto", "required"),
    "automatic_tax": {"enabled": bool},
    "invoice_creation": {"enabled": bool, "invoice_data": ANY},
    "locale": str,
    "payment_method_types": [str],
    "submit_type": ("auto", "book", "donate", "pay", "subscribe"),
    "consent_collection": ANY,
    "after_expiration": ANY,
    **EXPAND,
}
SESSION_LIST = {**LIST, "customer": str, "payment_intent": str, "subscription": str,
                "status": ("open", "complete", "expired"), "created": CREATED_RANGE}
PORTAL_CREATE = {"customer": str, "return_url": str, "configuration": str, "locale": str, "flow_data": ANY,
                 **EXPAND}
PORTAL_FEATURES = {
    "customer_update": {"enabled": bool, "allowed_updates": [("address", "email", "name", "phone", "shipping",
                                                             "tax_id")]},
    "invoice_history": {"enabled": bool},
    "payment_method_update": {"enabled": bool, "payment_method_configuration": str},
    "subscription_cancel": {"enabled": bool, "mode": ("at_period_end", "immediately"),
                            "proration_behavior": ("always_invoice", "create_prorations", "none"),
                            "cancellation_reason": {"enabled": bool, "options": [str], "feedback_options": [str]}},
    "subscription_pause": {"enabled": bool, "duration": ANY},
    "subscription_update": {
        "enabled": bool, "default_allowed_updates": [("price", "promotion_code", "quantity")],
        "products": [{"product": str, "prices": [str], "adjustable_quantity": {"enabled": bool, "maximum": int,
                                                                               "minimum": int}}],
        "proration_behavior": ("always_invoice", "create_prorations", "none"),
        "billing_cycle_anchor": ("now", "unchanged"),
        "schedule_at_period_end": {"conditions": [{"type": ("decreasing_item_amount", "shortening_interval")}]},
        "trial_update_behavior": ("continue_trial", "end_trial"),
    },
}
PORTAL_CONFIGURATION_CREATE = {
    "features": PORTAL_FEATURES, "business_profile": {"headline": str, "privacy_policy_url": str,
                                                      "terms_of_service_url": str},
    "default_return_url": str, "login_page": {"enabled": bool}, "metadata": METADATA, "name": str, **EXPAND}
PORTAL_CONFIGURATION_UPDATE = {**PORTAL_CONFIGURATION_CREATE, "active": bool}
PORTAL_CONFIGURATION_LIST = {**LIST, "active": bool, "is_default": bool}
PRODUCT_CREATE = {"name": str, "id": str, "active": bool, "description": str, "metadata": METADATA,
                  "tax_code": str, "unit_label": str, "statement_descriptor": str, **EXPAND}
PRODUCT_UPDATE = {"name": str, "active": bool, "description": str, "metadata": METADATA, "default_price": str,
                  "tax_code": str, "unit_label": str, "statement_descriptor": str, **EXPAND}
PRODUCT_LIST = {**LIST, "active": bool, "ids": [str], "created": CREATED_RANGE}
RECURRING = {"interval": ("day", "week", "month", "year"), "interval_count": int,
             "usage_type": ("licensed", "metered")}
PRICE_CREATE = {"currency": str, "unit_amount": int, "product": str,
                "product_data": {"name": str, "metadata": METADATA, "active": bool, "tax_code": str},
                "recurring": RECURRING, "lookup_key": str, "transfer_lookup_key": bool, "active": bool,
                "metadata": METADATA, "nickname": str, "tax_behavior": ("exclusive", "inclusive", "unspecified"),
                "billing_scheme": ("per_unit",), **EXPAND}
PRICE_UPDATE = {"active": bool, "metadata": METADATA, "nickname": str, "lookup_key": str,
                "transfer_lookup_key": bool, "tax_behavior": ("exclusive", "inclusive", "unspecified"), **EXPAND}
PRICE_LIST = {**LIST, "active": bool, "lookup_keys": [str], "product": str, "type": ("one_time", "recurring"),
              "currency": str, "created": CREATED_RANGE, "recurring": {"interval": str, "usage_type": str}}
CUSTOMER_CREATE = {"email": str, "name": str, "metadata": METADATA, "description": str, **EXPAND}
INVOICE_PAYMENT_LIST = {**LIST, "invoice": str, "status": str,
                        "payment": {"type": ("payment_intent", "charge"), "payment_intent": str, "charge": str}}
EVENT_LIST = {**LIST, "created": CREATED_RANGE | {"": int}, "type": str, "types": [str],
              "delivery_success": bool}
RETRIEVE = dict(EXPAND)
SUBSCRIPTION_CANCEL = {"cancellation_details": {"comment": str, "feedback": (
    "customer_service", "low_quality", "missing_features", "other", "switched_service", "too_complex",
    "too_expensive", "unused", "")}, "invoice_now": bool, "prorate": bool, **EXPAND}
REFUND_CREATE = {"payment_intent": str, "charge": str, "amount": int, "metadata": METADATA,
                 "reason": ("duplicate", "fraudulent", "requested_by_customer"), "instructions_email": str,
                 "refund_application_fee": bool, "reverse_transfer": bool, **EXPAND}

RETRIEVABLE = {  # path segment -> stored kind
    "charges": "charges", "payment_intents": "payment_intents", "invoices": "invoices",
    "subscriptions": "subscriptions", "disputes": "disputes", "refunds": "refunds", "customers": "customers",
}


class StripeErrorResponse(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"type": type, "message": message,
                               **({"param": param} if param else {}), **({"code": code} if code else {})}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> StripeErrorResponse:
    return StripeErrorResponse(400, message, param=param, code=code)


def missing(kind: str, object_id: str, *, param: str = "id") -> StripeErrorResponse:
    return StripeErrorResponse(400 if param != "id" else 404, f"No such {kind}: '{object_id}'",
                               param=param, code="resource_missing")


# --- form decoding ------------------------------------------------------------------------

def decode_form(pairs: list[tuple[str, str]]) -> dict:
    """Stripe's form encoding -> nested dicts and lists: `a[b][0][c]=v` -> {"a": {"b": [{"c": "v"}]}}."""
    root: dict = {}
    for raw_key, value in pairs:
        head, _, rest = raw_key.partition("[")
        parts = [head] + ([p for p in rest.rstrip("]").split("][")] if rest else [])
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise bad_request(f"Invalid parameter: {raw_key}", param=raw_key)
        node[parts[-1]] = value
    return _lists_from_indexes(root)


def _lists_from_indexes(node):
    if not isinstance(node, dict):
        return node
    converted = {k: _lists_from_indexes(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def validate(params: dict, schema: dict, prefix: str = "") -> dict:
    """Check names and scalar types against a schema; return params with ints and bools converted."""
    out = {}
    for name, value in params.items():
        full = f"{prefix}[{name}]" if prefix else name
        if name not in schema:
            raise bad_request(f"Received unknown parameter: {full}", param=full, code="parameter_unknown")
        out[name] = _check_value(value, schema[name], full)
    return out


def _check_value(value, rule, full: str):
    if rule is ANY:
        return value
    if rule is METADATA:
        if value == "":
            return {}
        if not isinstance(value, dict) or any(isinstance(v, (dict, list)) for v in value.values()):
            raise bad_request(f"Invalid object: {full} must be a map of strings", param=full)
        return dict(value)
    if isinstance(rule, dict):
        if not isinstance(value, dict):
            raise bad_request(f"Invalid object: {full}", param=full)
        return validate(value, rule, full)
    if isinstance(rule, list):
        if isinstance(value, str) and value == "":
            return []
        if not isinstance(value, list):
            raise bad_request(f"Invalid array: {full}", param=full)
        return [_check_value(v, rule[0], f"{full}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (dict, list)):
        raise bad_request(f"Invalid {full}: expected a single value", param=full)
    if isinstance(rule, tuple):
        if value not in rule:
            raise bad_request(f"Invalid {full}: must be one of {', '.join(rule)}", param=full)
        return value
    if rule is int:
        try:
            return int(value)
        except ValueError:
            raise bad_request(f"Invalid integer: {value}", param=full) from None
    if rule is bool:
        if value not in ("true", "false"):
            raise bad_request(f"Invalid boolean: {value}", param=full)
        return value == "true"
    return value


# --- the fake account ---------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    params: dict
    headers: dict
    idempotency_key: str | None
    status: int = 0


@dataclass
class _Failure:
    status: int = 429
    type: str = "rate_limit_error"
    message: str = "Too many requests hit the API too quickly."
    code: str | None = None
    connection_error: bool = False


class FailedConnection(Exception):
    """Raised by `StripeState.handle` when a connection error was injected."""


@dataclass
class StripeState:
    api_key: str | None = None
    now: Callable[[], float] = time.time
    objects: dict[str, dict[str, dict]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    # seconds the HTTP server (StripeServer) waits before answering: a slow Stripe
    latency: float = 0.0

    def __post_init__(self):
        self._lock = threading.RLock()
        self._idempotency: dict[tuple[str, str], tuple[tuple, int, dict]] = {}
        self._failures: list[_Failure] = []
        self._sequence = 0
        self.livemode = bool(self.api_key and "_live_" in self.api_key)

    # ---- helpers ----
    def _id(self, prefix: str, *, mode_tag: bool = False) -> str:
        self._sequence += 1
        token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(14))
        middle = ("live_" if self.livemode else "test_") if mode_tag else ""
        return f"{prefix}_{middle}{self._sequence:04d}{token}"

    def _store(self, kind: str) -> dict[str, dict]:
        return self.objects.setdefault(kind, {})

    def _now(self) -> int:
        return int(self.now())

    def requests_to(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def fail_next(self, *, status: int = 429, type: str = "rate_limit_error",
                  message: str = "Too many requests hit the API too quickly.", code: str | None = None,
                  times: int = 1, connection_error: bool = False) -> None:
        with self._lock:
            self._failures.extend(_Failure(status, type, message, code, connection_error) for _ in range(times))

    # ---- test-side object creation ----
    def add_product(self, *, name: str, id: str | None = None, active: bool = True, metadata: dict | None = None,
                    **extra) -> dict:
        with self._lock:
            product = {"id": id or self._id("prod"), "object": "product", "active": active, "name": name,
                       "description": None, "metadata": dict(metadata or {}), "default_price": None,
                       "created": self._now(), "updated": self._now(), "livemode": self.livemode, **extra}
            self._store("products")[product["id"]] = product
            return product

    def add_price(self, *, product: str | None = None, unit_amount: int, currency: str = "usd",
                  recurring: dict | None = None, lookup_key: str | None = None, active: bool = True,
                  id: str | None = None, metadata: dict | None = None, livemode: bool | None = None) -> dict:
        with self._lock:
            if product is None:
                product = self.add_product(name=f"Product for {lookup_key or 'price'}")["id"]
            price = {"id": id or self._id("price"), "object": "price", "active": active, "billing_scheme": "per_unit",
                     "created": self._now(), "currency": currency,
                     "livemode": self.livemode if livemode is None else livemode,
                     "lookup_key": lookup_key, "metadata": dict(metadata or {}), "nickname": None,
                     "product": product, "recurring": _recurring(recurring), "tax_behavior": "unspecified",
                     "type": "recurring" if recurring else "one_time", "unit_amount": unit_amount,
                     "unit_amount_decimal": str(unit_amount)}
            self._store("prices")[price["id"]] = price
            return price

    def seed_catalog(self, items) -> dict[str, str]:
        """Products and prices matching catalog items (with their lookup keys): {item_key: price_id}."""
        ids = {}
        for item in items:
            product = self.add_product(name=item.name, metadata={"item": item.key})
            price = self.add_price(product=product["id"], unit_amount=item.amount_cents, currency=item.currency,
                                   recurring={"interval": "month"} if item.kind == "plan" else None,
                                   lookup_key=item.lookup_key)
            ids[item.key] = price["id"]
        return ids

    def add_customer(self, *, id: str | None = None, email: str | None = None, name: str | None = None,
                     metadata: dict | None = None) -> dict:
        with self._lock:
            customer = {"id": id or self._id("cus"), "object": "customer", "email": email, "name": name,
                        "metadata": dict(metadata or {}), "created": self._now(), "livemode": self.livemode,
                        "balance": 0, "currency": None, "delinquent": False, "description": None}
            self._store("customers")[customer["id"]] = customer
            return customer

    def add_checkout_session(self, **fields) -> dict:
        with self._lock:
            mode = fields.get("mode", "payment")
            session = {"id": self._id("cs", mode_tag=True), "object": "checkout.session", "mode": mode,
                       "status": "open", "payment_status": "unpaid", "client_reference_id": None, "metadata": {},
                       "customer": None, "customer_email": None, "customer_creation": None,
                       "customer_details": None, "payment_intent": None, "subscription": None, "invoice": None,
                       "amount_total": 0, "amount_subtotal": 0, "currency": "usd", "created": self._now(),
                       "expires_at": self._now() + 24 * 3600, "livemode": self.livemode, "success_url": None,
                       "cancel_url": None, "ui_mode": "hosted", "_line_items": []}
            session.update(fields)
            session.setdefault("url", f"https://checkout.stripe.com/c/pay/{session['id']}")
            self._store("checkout_sessions")[session["id"]] = session
            return _public(session)

    def complete_checkout_session(self, session_id: str, *, payment_status: str = "paid",
                                  customer: str | None = None, payment_intent: str | None = None,
                                  subscription: str | None = None, invoice: str | None = None) -> dict:
        with self._lock:
            session = self._store("checkout_sessions")[session_id]
            if customer is None and session["customer"] is None:
                customer = self.add_customer(email=session.get("customer_email"))["id"]
            if payment_intent is None and session["mode"] == "payment":
                payment_intent = self._id("pi")
            if subscription is None and session["mode"] == "subscription":
                subscription = self._id("sub")
            session.update(status="complete", payment_status=payment_status, url=None,
                           customer=customer or session["customer"],
                           payment_intent=payment_intent or session["payment_intent"],
                           subscription=subscription or session["subscription"],
                           invoice=invoice or session["invoice"])
            email = session.get("customer_email")
            session["customer_details"] = {"email": email, "name": None}
            return _public(session)

    def expire_checkout_session(self, session_id: str) -> dict:
        with self._lock:
            session = self._store("checkout_sessions")[session_id]
            session.update(status="expired", url=None)
            return _public(session)

    def add_invoice_payment(self, *, invoice: str, payment_intent: str | None = None, charge: str | None = None,
                            amount_paid: int = 0, currency: str = "usd", status: str = "paid",
                            id: str | None = None, is_default: bool = True) -> dict:
        with self._lock:
            payment = ({"type": "payment_intent", "payment_intent": payment_intent} if payment_intent
                       else {"type": "charge", "charge": charge})
            record = {"id": id or self._id("inpay"), "object": "invoice_payment", "amount_paid": amount_paid,
                      "amount_requested": amount_paid, "created": self._now(), "currency": currency,
                      "invoice": invoice, "is_default": is_default, "livemode": self.livemode, "payment": payment,
                      "status": status, "status_transitions": {"canceled_at": None,
                                                               "paid_at": self._now() if status == "paid" else None}}
            self._store("invoice_payments")[record["id"]] = record
            return record

    def add_object(self, kind: str, obj: dict) -> dict:
        """Store a charge, payment_intent, invoice, subscription, dispute or refund (needs an `id`)."""
        if kind not in RETRIEVABLE.values():
            raise ValueError(f"unknown kind {kind!r}; one of {sorted(set(RETRIEVABLE.values()))}")
        with self._lock:
            self._store(kind)[obj["id"]] = obj
            return obj

    def add_charge(self, *, id: str | None = None, payment_intent: str | None = None, amount: int = 0,
                   amount_refunded: int = 0, currency: str = "usd", customer: str | None = None, **extra) -> dict:
        with self._lock:
            charge = {"id": id or self._id("ch"), "object": "charge", "amount": amount,
                      "amount_captured": amount, "amount_refunded": amount_refunded, "currency": currency,
                      "customer": customer, "payment_intent": payment_intent, "paid": True, "captured": True,
                      "refunded": amount_refunded >= amount > 0, "disputed": False, "status": "succeeded",
                      "created": self._now(), "livemode": self.livemode, "metadata": {}, **extra}
            return self.add_object("charges", charge)

    def add_event(self, type: str, data_object: dict, *, id: str | None = None, created: int | None = None,
                  api_version: str | None = None, livemode: bool | None = None,
                  previous_attributes: dict | None = None) -> dict:
        with self._lock:
            data = {"object": data_object}
            if previous_attributes is not None:
                data["previous_attributes"] = previous_attributes
            event = {"id": id or self._id("evt"), "object": "event", "api_version": api_version or API_VERSION,
                     "created": self._now() if created is None else int(created), "data": data,
                     "livemode": self.livemode if livemode is None else livemode, "pending_webhooks": 0,
                     "request": {"id": None, "idempotency_key": None}, "type": type, "_seq": self._sequence}
            self._sequence += 1
            self._store("events")[event["id"]] = event
            return _public(event)

    # ---- request handling (shared by FakeHTTPClient and StripeServer) ----
    def handle(self, method: str, url: str, headers: dict, body: str | bytes | None) -> tuple[int, dict]:
        """Answer one API request: (status, JSON body). Raises FailedConnection for an injected one."""
        method = method.upper()
        parts = urlsplit(url)
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        if isinstance(body, bytes):
            body = body.decode("utf-8")
        pairs = parse_qsl(parts.query, keep_blank_values=True) + parse_qsl(body or "", keep_blank_values=True)
        key = headers.get("idempotency-key")
        with self._lock:
            try:
                params = decode_form(pairs)
            except StripeErrorResponse:
                params = {"_raw": pairs}
            request = Request(method, parts.path, params, headers, key)
            self.requests.append(request)
            request.status, answer = self._answer(method, parts.path, pairs, headers, key)
            return request.status, answer

    def _answer(self, method, path, pairs, headers, key) -> tuple[int, dict]:
        if self._failures:
            failure = self._failures.pop(0)
            if failure.connection_error:
                raise FailedConnection("injected connection failure")
            body = StripeErrorResponse(failure.status, failure.message, type=failure.type, code=failure.code).body
            return failure.status, body
        try:
            auth_error = self._check_auth(headers.get("authorization", ""))
            if auth_error:
                return 401, auth_error
            params = decode_form(pairs)
            if method == "POST" and key:
                fingerprint = (method, path, tuple(sorted(pairs)))
                cache_key = (headers.get("authorization", ""), key)
                if cache_key in self._idempotency:
                    first, status, answer = self._idempotency[cache_key]
                    if first != fingerprint:
                        raise StripeErrorResponse(
                            400, "Keys for idempotent requests can only be used with the same parameters they "
                            f"were first used with. Try using a key other than '{key}' if you meant to execute "
                            "a different request.", type="idempotency_error")
                    return status, json.loads(json.dumps(answer))
            answer = json.loads(json.dumps(self._route(method, path, params)))
            if method == "POST" and key:
                self._idempotency[(headers.get("authorization", ""), key)] = (fingerprint, 200, answer)
            return 200, json.loads(json.dumps(answer))
        except StripeErrorResponse as exc:
            return exc.status, exc.body

    def _check_auth(self, authorization: str) -> dict | None:
        if not authorization.startswith("Bearer ") or not authorization[7:].strip():
            return StripeErrorResponse(401, "You did not provide an API key. You need to provide your API key "
                                       "in the Authorization header, using Bearer auth.").body
        given = authorization[7:].strip()
        valid = given == self.api_key if self.api_key else given.startswith(KEY_PREFIXES)
        if not valid:
            shown = given[:8] + "*" * 8 + given[-4:] if len(given) > 12 else "****"
            return StripeErrorResponse(401, f"Invalid API Key provided: {shown}").body
        if not self.api_key:
            self.livemode = "_live_" in given
        return None

    def _route(self, method: str, path: str, params: dict) -> dict:
        segments = [s for s in path.split("/") if s]
        if not segments or segments[0] != "v1":
            raise StripeErrorResponse(404, f"Unrecognized request URL ({method}: {path}).")
        route = segments[1:]
        handler = ROUTES.get((method, _pattern(route)))
        if handler is None:
            raise StripeErrorResponse(404, f"Unrecognized request URL ({method}: {path}).")
        ids = [s for s, p in zip(route, _pattern(route)) if p == "*"]
        return handler(self, params, *ids)

    # ---- checkout sessions ----
    def _create_session(self, params: dict) -> dict:
        params = validate(params, SESSION_CREATE)
        mode = params.get("mode")
        if not mode:
            raise bad_request("Missing required param: mode.", param="mode", code="parameter_missing")
        if params.get("customer") and params.get("customer_email"):
            raise bad_request("You may only specify one of these parameters: customer, customer_email.",
                              param="customer_email")
        if params.get("customer_creation"):
            if mode != "payment":
                raise bad_request("`customer_creation` can only be used in `payment` mode.",
                                  param="customer_creation")
            if params.get("customer"):
                raise bad_request("You may only specify one of these parameters: customer, customer_creation.",
                                  param="customer_creation")
        if params.get("customer") and params["customer"] not in self._store("customers"):
            raise missing("customer", params["customer"], param="customer")
        if "subscription_data" in params and mode != "subscription":
            raise bad_request(f"You can not pass `subscription_data` in `{mode}` mode.", param="subscription_data")
        if "payment_intent_data" in params and mode != "payment":
            raise bad_request(f"You can not pass `payment_intent_data` in `{mode}` mode.",
                              param="payment_intent_data")
        now = self._now()
        expires_at = params.get("expires_at", now + 24 * 3600)
        if not now + 30 * 60 <= expires_at <= now + 24 * 3600:
            raise bad_request("The `expires_at` timestamp must be between 30 minutes and 24 hours from Checkout "
                              "Session creation.", param="expires_at")
        line_items = params.get("line_items") or []
        if mode in ("payment", "subscription") and not line_items:
            raise bad_request("Missing required param: line_items.", param="line_items", code="parameter_missing")
        amount, currency, stored_items = 0, None, []
        for index, line in enumerate(line_items):
            param = f"line_items[{index}][price]"
            price = self._store("prices").get(line.get("price", ""))
            if price is None:
                raise missing("price", line.get("price", ""), param=param)
            if not price["active"]:
                raise bad_request(f"The price specified is inactive. This field only accepts active prices.",
                                  param=param)
            if price["type"] == "recurring" and mode == "payment":
                raise bad_request("You must be in `subscription` mode to specify a recurring price.", param=param)
            if price["type"] == "one_time" and mode == "subscription" and len(line_items) == 1:
                raise bad_request("You must specify at least one recurring price in `subscription` mode when "
                                  "using prices.", param=param)
            if "quantity" not in line:
                raise bad_request("Missing required param: line_items[0][quantity].",
                                  param=f"line_items[{index}][quantity]", code="parameter_missing")
            amount += price["unit_amount"] * line["quantity"]
            currency = price["currency"]
            stored_items.append({"id": self._id("li"), "object": "item", "price": dict(price),
                                 "quantity": line["quantity"], "amount_total": price["unit_amount"] * line["quantity"],
                                 "amount_subtotal": price["unit_amount"] * line["quantity"], "currency": currency,
                                 "description": self._store("products").get(price["product"], {}).get("name")})
        return self.add_checkout_session(
            mode=mode, client_reference_id=params.get("client_reference_id"), metadata=params.get("metadata", {}),
            customer=params.get("customer"), customer_email=params.get("customer_email"),
            customer_creation=params.get("customer_creation") or ("if_required" if mode == "payment" else None),
            amount_total=amount, amount_subtotal=amount, currency=currency or "usd", expires_at=expires_at,
            success_url=params.get("success_url"), cancel_url=params.get("cancel_url"),
            ui_mode=params.get("ui_mode", "hosted"), _line_items=stored_items,
            _subscription_data=params.get("subscription_data"), _payment_intent_data=params.get("payment_intent_data"))

    def _retrieve_session(self, params: dict, session_id: str) -> dict:
        params = validate(params, RETRIEVE)
        session = self._get("checkout_sessions", session_id, "checkout.session")
        result = _public(session)
        if "line_items" in params.get("expand", []):
            result["line_items"] = _list(session["_line_items"], "/v1/checkout/sessions/%s/line_items" % session_id)
        return result

    def _expire_session(self, params: dict, session_id: str) -> dict:
        validate(params, RETRIEVE)
        session = self._get("checkout_sessions", session_id, "checkout.session")
        if session["status"] != "open":
            raise bad_request(f"Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout "
                              f"Session has a status of \"{session['status']}\".")
        return self.expire_checkout_session(session_id)

    def _session_line_items(self, params: dict, session_id: str) -> dict:
        validate(params, LIST)
        session = self._get("checkout_sessions", session_id, "checkout.session")
        return _list(session["_line_items"], f"/v1/checkout/sessions/{session_id}/line_items")

    def _list_sessions(self, params: dict) -> dict:
        params = validate(params, SESSION_LIST)
        rows = [s for s in self._store("checkout_sessions").values()
                if all(s.get(name) == params[name] for name in ("customer", "payment_intent", "subscription",
                                                                 "status") if name in params)
                and _in_range(s["created"], params.get("created"))]
        return _page(sorted(rows, key=lambda s: s["created"], reverse=True), params, "/v1/checkout/sessions")

    def _create_portal_session(self, params: dict) -> dict:
        params = validate(params, PORTAL_CREATE)
        customer = params.get("customer")
        if not customer:
            raise bad_request("Missing required param: customer.", param="customer", code="parameter_missing")
        if customer not in self._store("customers"):
            raise missing("customer", customer, param="customer")
        configuration = params.get("configuration")
        if configuration is not None:
            found = self._get_param("portal_configurations", configuration, "configuration", "configuration")
            if not found["active"]:
                raise bad_request("The configuration specified is inactive.", param="configuration")
        else:
            configuration = self._default_portal_configuration()["id"]
        portal_id = self._id("bps")
        session = {"id": portal_id, "object": "billing_portal.session", "customer": customer,
                   "configuration": configuration,
                   "return_url": params.get("return_url"), "created": self._now(), "livemode": self.livemode,
                   "url": f"https://billing.stripe.com/p/session/{portal_id}"}
        self._store("portal_sessions")[portal_id] = session
        return session

    # ---- customer portal configurations ----
    def add_portal_configuration(self, *, features: dict | None = None, metadata: dict | None = None,
                                 is_default: bool = False, active: bool = True, **extra) -> dict:
        """A stored configuration with Stripe's full `features` shape (defaults filled in)."""
        with self._lock:
            configuration = {"id": self._id("bpc"), "object": "billing_portal.configuration", "active": active,
                             "application": None, "business_profile": {"headline": None, "privacy_policy_url": None,
                                                                       "terms_of_service_url": None},
                             "created": self._now(), "updated": self._now(), "default_return_url": None,
                             "features": _portal_features(features or {}), "is_default": is_default,
                             "livemode": self.livemode, "login_page": {"enabled": False, "url": None},
                             "metadata": dict(metadata or {}), "name": None, **extra}
            self._store("portal_configurations")[configuration["id"]] = configuration
            return configuration

    def _default_portal_configuration(self) -> dict:
        for configuration in self._store("portal_configurations").values():
            if configuration["is_default"]:
                return configuration
        return self.add_portal_configuration(is_default=True)

    def _check_portal_features(self, features: dict) -> None:
        update = features.get("subscription_update") or {}
        for index, product in enumerate(update.get("products") or []):
            param = f"features[subscription_update][products][{index}]"
            for name in ("product", "prices"):
                if name not in product:
                    raise bad_request(f"Missing required param: {param}[{name}].", param=f"{param}[{name}]",
                                      code="parameter_missing")
            self._get_param("products", product["product"], "product", f"{param}[product]")
            for number, price_id in enumerate(product["prices"]):
                price = self._get_param("prices", price_id, "price", f"{param}[prices][{number}]")
                if price["product"] != product["product"]:
                    raise bad_request(f"The price {price_id} does not belong to product {product['product']}.",
                                      param=f"{param}[prices][{number}]")
                if price["type"] != "recurring" or not price["active"]:
                    raise bad_request(f"The price {price_id} must be an active recurring price.",
                                      param=f"{param}[prices][{number}]")
        if update.get("enabled") and "price" in (update.get("default_allowed_updates") or []) \
                and not update.get("products"):
            raise bad_request("At least one product must be specified when subscription updates allow price "
                              "changes.", param="features[subscription_update][products]")
        cancel = features.get("subscription_cancel") or {}
        if cancel.get("proration_behavior") == "always_invoice":
            raise bad_request("`always_invoice` is not a valid proration behavior for cancellation.",
                              param="features[subscription_cancel][proration_behavior]")
        if cancel.get("proration_behavior") == "create_prorations" and cancel.get("mode") != "immediately":
            raise bad_request("`create_prorations` is only compatible with `mode=immediately`.",
                              param="features[subscription_cancel][proration_behavior]")
        for name, feature in features.items():
            if isinstance(feature, dict) and name != "subscription_pause" and "enabled" not in feature:
                raise bad_request(f"Missing required param: features[{name}][enabled].",
                                  param=f"features[{name}][enabled]", code="parameter_missing")

    def _create_portal_configuration(self, params: dict) -> dict:
        params = validate(params, PORTAL_CONFIGURATION_CREATE)
        if "features" not in params:
            raise bad_request("Missing required param: features.", param="features", code="parameter_missing")
        self._check_portal_features(params["features"])
        params.pop("expand", None)
        return self.add_portal_configuration(**params)

    def _update_portal_configuration(self, params: dict, configuration_id: str) -> dict:
        params = validate(params, PORTAL_CONFIGURATION_UPDATE)
        configuration = self._get("portal_configurations", configuration_id, "configuration")
        features = params.get("features") or {}
        merged = {name: {**configuration["features"][name], **value} for name, value in features.items()}
        for value in merged.values():  # the enabled flag may be left out on update
            value.setdefault("enabled", False)
        self._check_portal_features(merged)
        for name, value in merged.items():
            configuration["features"][name] = _portal_features({name: value})[name]
        if "metadata" in params:
            configuration["metadata"] = _merge_metadata(configuration["metadata"], params["metadata"])
        for name in ("active", "default_return_url", "name"):
            if name in params:
                configuration[name] = params[name]
        if "business_profile" in params:
            configuration["business_profile"].update(params["business_profile"])
        configuration["updated"] = self._now()
        return configuration

    def _list_portal_configurations(self, params: dict) -> dict:
        params = validate(params, PORTAL_CONFIGURATION_LIST)
        rows = [c for c in self._store("portal_configurations").values()
                if all(c[name] == params[name] for name in ("active", "is_default") if name in params)]
        return _page(list(reversed(rows)), params, "/v1/billing_portal/configurations")

    def _retrieve_portal_configuration(self, params: dict, configuration_id: str) -> dict:
        validate(params, RETRIEVE)
        return self._get("portal_configurations", configuration_id, "configuration")

    # ---- products and prices ----
    def _create_product(self, params: dict) -> dict:
        params = validate(params, PRODUCT_CREATE)
        if not params.get("name"):
            raise bad_request("Missing required param: name.", param="name", code="parameter_missing")
        if params.get("id") in self._store("products"):
            raise bad_request("Product already exists.", param="id", code="resource_already_exists")
        return self.add_product(**params)

    def _update_product(self, params: dict, product_id: str) -> dict:
        params = validate(params, PRODUCT_UPDATE)
        product = self._get("products", product_id, "product")
        params.pop("expand", None)
        if "metadata" in params:
            product["metadata"] = _merge_metadata(product["metadata"], params.pop("metadata"))
        product.update(params, updated=self._now())
        return product

    def _list_products(self, params: dict) -> dict:
        params = validate(params, PRODUCT_LIST)
        rows = [p for p in self._store("products").values()
                if ("active" not in params or p["active"] == params["active"])
                and ("ids" not in params or p["id"] in params["ids"])]
        return _page(list(reversed(rows)), params, "/v1/products")

    def _create_price(self, params: dict) -> dict:
        params = validate(params, PRICE_CREATE)
        for name in ("currency",):
            if not params.get(name):
                raise bad_request(f"Missing required param: {name}.", param=name, code="parameter_missing")
        if "unit_amount" not in params:
            raise bad_request("Missing required param: unit_amount.", param="unit_amount", code="parameter_missing")
        if params.get("product") and params.get("product_data"):
            raise bad_request("You may only specify one of these parameters: product, product_data.",
                              param="product_data")
        if params.get("product"):
            self._get_param("products", params["product"], "product", "product")
            product_id = params["product"]
        elif params.get("product_data"):
            product_id = self.add_product(**params["product_data"])["id"]
        else:
            raise bad_request("Missing required param: product.", param="product", code="parameter_missing")
        lookup_key = params.get("lookup_key")
        if lookup_key:
            self._take_lookup_key(lookup_key, params.get("transfer_lookup_key", False))
        recurring = params.get("recurring")
        price = self.add_price(product=product_id, unit_amount=params["unit_amount"], currency=params["currency"],
                               recurring=recurring, lookup_key=lookup_key, active=params.get("active", True),
                               metadata=params.get("metadata"))
        if params.get("nickname"):
            price["nickname"] = params["nickname"]
        return self._expand_price(price, params)

    def _take_lookup_key(self, lookup_key: str, transfer: bool, *, keep: str | None = None) -> None:
        for other in self._store("prices").values():
            if other["lookup_key"] == lookup_key and other["id"] != keep:
                if not transfer:
                    raise bad_request(f"A price (`{other['id']}`) already uses that lookup key.",
                                      param="lookup_key")
                other["lookup_key"] = None

    def _update_price(self, params: dict, price_id: str) -> dict:
        params = validate(params, PRICE_UPDATE)
        price = self._get("prices", price_id, "price")
        if params.get("lookup_key"):
            self._take_lookup_key(params["lookup_key"], params.get("transfer_lookup_key", False), keep=price_id)
            price["lookup_key"] = params["lookup_key"]
        for name in ("active", "nickname", "tax_behavior"):
            if name in params:
                price[name] = params[name]
        if "metadata" in params:
            price["metadata"] = _merge_metadata(price["metadata"], params["metadata"])
        return self._expand_price(price, params)

    def _list_prices(self, params: dict) -> dict:
        params = validate(params, PRICE_LIST)
        if len(params.get("lookup_keys", [])) > 10:
            raise bad_request("You may only specify up to 10 lookup keys.", param="lookup_keys")
        rows = [p for p in self._store("prices").values()
                if ("active" not in params or p["active"] == params["active"])
                and ("lookup_keys" not in params or p["lookup_key"] in params["lookup_keys"])
                and all(p[name] == params[name] for name in ("product", "type", "currency") if name in params)]
        page = _page(list(reversed(rows)), params, "/v1/prices")
        page["data"] = [self._expand_price(p, params, prefix="data.") for p in page["data"]]
        return page

    def _retrieve_price(self, params: dict, price_id: str) -> dict:
        params = validate(params, RETRIEVE)
        return self._expand_price(self._get("prices", price_id, "price"), params)

    def _expand_price(self, price: dict, params: dict, *, prefix: str = "") -> dict:
        result = dict(price)
        if f"{prefix}product" in params.get("expand", []):
            result["product"] = dict(self._store("products").get(price["product"], {"id": price["product"]}))
        return result

    # ---- customers, invoice payments, events, retrievable objects ----
    def _create_customer(self, params: dict) -> dict:
        params = validate(params, CUSTOMER_CREATE)
        params.pop("expand", None)
        description = params.pop("description", None)
        customer = self.add_customer(**params)
        customer["description"] = description
        return customer

    def _list_invoice_payments(self, params: dict) -> dict:
        params = validate(params, INVOICE_PAYMENT_LIST)
        payment = params.get("payment", {})
        if not params.get("invoice") and not payment:
            raise bad_request("You must specify either `invoice` or `payment`.", param="invoice")
        rows = [r for r in self._store("invoice_payments").values()
                if ("invoice" not in params or r["invoice"] == params["invoice"])
                and ("status" not in params or r["status"] == params["status"])
                and all(r["payment"].get(name) == value for name, value in payment.items())]
        return _page(list(reversed(rows)), params, "/v1/invoice_payments")

    def _cancel_subscription(self, params: dict, subscription_id: str) -> dict:
        params = validate(params, SUBSCRIPTION_CANCEL)
        subscription = self._get("subscriptions", subscription_id, "subscription")
        if subscription.get("status") in ("canceled", "incomplete_expired"):
            raise bad_request(f"A canceled subscription can not be canceled again: '{subscription_id}'.",
                              code="resource_missing")
        now = self._now()
        subscription.update(status="canceled", canceled_at=now, ended_at=now, cancel_at_period_end=False,
                            cancellation_details={"comment": None, "feedback": None, "reason": "cancellation_requested",
                                                  **params.get("cancellation_details", {})})
        return subscription

    def _create_refund(self, params: dict) -> dict:
        params = validate(params, REFUND_CREATE)
        if bool(params.get("payment_intent")) == bool(params.get("charge")):
            raise bad_request("You must pass either `payment_intent` or `charge` (not both).", param="charge")
        charges = self._store("charges")
        if params.get("charge"):
            charge = self._get_param("charges", params["charge"], "charge", "charge")
        else:
            found = [c for c in charges.values() if c.get("payment_intent") == params["payment_intent"]]
            if not found:
                raise missing("payment_intent", params["payment_intent"], param="payment_intent")
            charge = found[-1]
        left = charge["amount"] - charge.get("amount_refunded", 0)
        if left <= 0:
            raise bad_request(f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded")
        amount = params.get("amount", left)
        if not 0 < amount <= left:
            raise bad_request(f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                              param="amount")
        charge["amount_refunded"] = charge.get("amount_refunded", 0) + amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        refund = {"id": self._id("re"), "object": "refund", "amount": amount, "charge": charge["id"],
                  "currency": charge["currency"], "payment_intent": charge.get("payment_intent"),
                  "reason": params.get("reason"), "metadata": params.get("metadata", {}), "status": "succeeded",
                  "created": self._now()}
        return self.add_object("refunds", refund)

    def _list_events(self, params: dict) -> dict:
        params = validate(params, EVENT_LIST)
        types = params.get("types") or ([params["type"]] if "type" in params else None)
        rows = [e for e in self._store("events").values()
                if (types is None or any(_type_matches(e["type"], t) for t in types))
                and _in_range(e["created"], params.get("created"))]
        rows.sort(key=lambda e: (e["created"], e["_seq"]), reverse=True)
        page = _page(rows, params, "/v1/events")
        page["data"] = [_public(e) for e in page["data"]]
        return page

    def _retrieve_event(self, params: dict, event_id: str) -> dict:
        validate(params, RETRIEVE)
        return _public(self._get("events", event_id, "event"))

    def _get(self, kind: str, object_id: str, label: str) -> dict:
        obj = self._store(kind).get(object_id)
        if obj is None:
            raise missing(label, object_id)
        return obj

    def _get_param(self, kind: str, object_id: str, label: str, param: str) -> dict:
        obj = self._store(kind).get(object_id)
        if obj is None:
            raise missing(label, object_id, param=param)
        return obj


def _recurring(recurring: dict | None) -> dict | None:
    if not recurring:
        return None
    return {"interval": recurring["interval"], "interval_count": int(recurring.get("interval_count", 1)),
            "meter": None, "usage_type": recurring.get("usage_type", "licensed"), "trial_period_days": None}


def _portal_features(given: dict) -> dict:
    """A configuration's `features` as Stripe returns it: every feature present, unset fields filled in."""
    update = dict(given.get("subscription_update") or {})
    cancel = dict(given.get("subscription_cancel") or {})
    return {
        "customer_update": {"enabled": False, "allowed_updates": [], **(given.get("customer_update") or {})},
        "invoice_history": {"enabled": False, **(given.get("invoice_history") or {})},
        "payment_method_update": {"enabled": False, "payment_method_configuration": None,
                                  **(given.get("payment_method_update") or {})},
        "subscription_cancel": {"enabled": False, "mode": "at_period_end", "proration_behavior": "none",
                                "cancellation_reason": {"enabled": False, "options": []}, **cancel},
        "subscription_pause": {"enabled": False},
        "subscription_update": {
            "enabled": False, "default_allowed_updates": [], "proration_behavior": "none",
            "billing_cycle_anchor": None, "trial_update_behavior": "end_trial", **update,
            "products": [{"product": p["product"], "prices": list(p["prices"]),
                          "adjustable_quantity": {"enabled": False, "maximum": None, "minimum": 1,
                                                  **(p.get("adjustable_quantity") or {})}}
                         for p in update.get("products") or []],
            "schedule_at_period_end": {"conditions": [dict(c) for c in (update.get("schedule_at_period_end") or {})
                                                      .get("conditions", [])]},
        },
    }


def _merge_metadata(current: dict, update: dict) -> dict:
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _type_matches(event_type: str, wanted: str) -> bool:
    return wanted == event_type or (wanted.endswith("*") and event_type.startswith(wanted[:-1]))


def _in_range(value: int, created) -> bool:
    if created is None:
        return True
    if isinstance(created, dict):
        checks = {"gt": value > created.get("gt", value - 1), "gte": value >= created.get("gte", value),
                  "lt": value < created.get("lt", value + 1), "lte": value <= created.get("lte", value),
                  "": value == created.get("", value)}
        return all(checks.values())
    return value == int(created)


def _list(rows: list[dict], url: str) -> dict:
    return {"object": "list", "data": [_public(r) for r in rows], "has_more": False, "url": url}


def _page(rows: list[dict], params: dict, url: str) -> dict:
    """Stripe's cursor paging over rows already in list order (newest first)."""
    limit = params.get("limit", 10)
    if not 1 <= limit <= 100:
        raise bad_request("Invalid limit: must be between 1 and 100.", param="limit")
    if "starting_after" in params and "ending_before" in params:
        raise bad_request("You may only specify one of these parameters: ending_before, starting_after.",
                          param="ending_before")
    ids = [r["id"] for r in rows]
    for name in ("starting_after", "ending_before"):
        if name in params and params[name] not in ids:
            raise bad_request(f"Invalid {name}: no such object {params[name]!r} in this list.", param=name)
    if "starting_after" in params:
        rest = rows[ids.index(params["starting_after"]) + 1:]
        chosen, has_more = rest[:limit], len(rest) > limit
    elif "ending_before" in params:
        before = rows[:ids.index(params["ending_before"])]
        chosen, has_more = before[-limit:], len(before) > limit
    else:
        chosen, has_more = rows[:limit], len(rows) > limit
    return {"object": "list", "data": [_public(r) for r in chosen], "has_more": has_more, "url": url}


def _pattern(route: list[str]) -> tuple[str, ...]:
    """Path segments with object ids replaced by '*' (ids are the segments after a collection name)."""
    known = {"checkout", "sessions", "billing_portal", "configurations", "products", "prices", "customers",
             "invoice_payments", "events", "line_items", "expire", *RETRIEVABLE}
    return tuple(s if s in known else "*" for s in route)


ROUTES: dict[tuple[str, tuple[str, ...]], Callable] = {
    ("POST", ("checkout", "sessions")): StripeState._create_session,
    ("GET", ("checkout", "sessions")): StripeState._list_sessions,
    ("GET", ("checkout", "sessions", "*")): StripeState._retrieve_session,
    ("GET", ("checkout", "sessions", "*", "line_items")): StripeState._session_line_items,
    ("POST", ("checkout", "sessions", "*", "expire")): StripeState._expire_session,
    ("POST", ("billing_portal", "sessions")): StripeState._create_portal_session,
    ("POST", ("billing_portal", "configurations")): StripeState._create_portal_configuration,
    ("GET", ("billing_portal", "configurations")): StripeState._list_portal_configurations,
    ("GET", ("billing_portal", "configurations", "*")): StripeState._retrieve_portal_configuration,
    ("POST", ("billing_portal", "configurations", "*")): StripeState._update_portal_configuration,
    ("POST", ("products",)): StripeState._create_product,
    ("GET", ("products",)): StripeState._list_products,
    ("GET", ("products", "*")): lambda s, p, i: (validate(p, RETRIEVE), s._get("products", i, "product"))[1],
    ("POST", ("products", "*")): StripeState._update_product,
    ("POST", ("prices",)): StripeState._create_price,
    ("GET", ("prices",)): StripeState._list_prices,
    ("GET", ("prices", "*")): StripeState._retrieve_price,
    ("POST", ("prices", "*")): StripeState._update_price,
    ("POST", ("customers",)): StripeState._create_customer,
    ("GET", ("invoice_payments",)): StripeState._list_invoice_payments,
    ("GET", ("events",)): StripeState._list_events,
    ("DELETE", ("subscriptions", "*")): StripeState._cancel_subscription,
    ("POST", ("refunds",)): StripeState._create_refund,
    ("GET", ("events", "*")): StripeState._retrieve_event,
}


def _retrieve_kind(kind: str) -> Callable:
    def retrieve(state: StripeState, params: dict, object_id: str) -> dict:
        validate(params, RETRIEVE)
        return state._get(kind, object_id, kind.rstrip("s").replace("_", " "))
    return retrieve


for _segment, _kind in RETRIEVABLE.items():
    ROUTES[("GET", (_segment, "*"))] = _retrieve_kind(_kind)


# --- the two ways in ----------------------------------------------------------------------

class FakeHTTPClient(stripe.HTTPClient):
    """A `stripe.HTTPClient` answering from a StripeState; records every request in `state.requests`."""

    name = "stripe-double"

    def __init__(self, state: StripeState | None = None):
        super().__init__()
        self.state = state or StripeState()

    @property
    def requests(self) -> list[Request]:
        return self.state.requests

    def request(self, method, url, headers, post_data=None, *, _usage=None):
        try:
            status, body = self.state.handle(method, url, dict(headers or {}), post_data)
        except FailedConnection:
            raise stripe.APIConnectionError("Unexpected error communicating with Stripe. (Network error: "
                                            "injected connection failure)", should_retry=True) from None
        return json.dumps(body), status, {"request-id": f"req_{len(self.state.requests)}",
                                          "content-type": "application/json"}

    def request_stream(self, method, url, headers, post_data=None, *, _usage=None):
        raise NotImplementedError("the Stripe double does not stream")

    def _sleep_time_seconds(self, num_retries: int) -> float:
        return 0.0

    def close(self):
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: StripeState  # set per server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.server.state.latency:
            time.sleep(self.server.state.latency)
        try:
            status, answer = self.server.state.handle(self.command, self.path, dict(self.headers.items()), body)
        except FailedConnection:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Request-Id", f"req_{len(self.server.state.requests)}")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, format, *args):  # keep test output clean
        pass


class StripeServer:
    """A Stripe-compatible HTTP server on 127.0.0.1 for STRIPE_API_BASE; `with StripeServer() as s: s.url`."""

    def __init__(self, state: StripeState | None = None):
        self.state = state or StripeState()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.state = self.state
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "StripeServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="stripe-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join()

    def __enter__(self) -> "StripeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stripe_error(response_body: dict) -> dict[str, Any]:
    """The `error` object of a response body (for assertions)."""
    return response_body.get("error", {})
