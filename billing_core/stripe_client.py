"""The one way to reach Stripe: a `stripe.StripeClient` built from settings, and Stripe errors
turned into one-line messages that name the cause and never contain a key.

    client = get_stripe_client()                      # raises StripeNotConfigured without a key
    with stripe_errors("creating the checkout link"):  # StripeError -> StripeActionError
        client.v1.checkout.sessions.create(params=...)
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import stripe

from .settings import Settings, get_settings, mask_secret

MAX_NETWORK_RETRIES = 2
NOT_CONFIGURED = ("Stripe is not configured: set STRIPE_SECRET_KEY in config/.env (a test key sk_test_... "
                  "from https://dashboard.stripe.com/test/apikeys), then run `python -m billing_core check-config`")
_KEY_PATTERN = re.compile(r"\b(?:sk|rk|pk)_(?:test|live)_[A-Za-z0-9*]+|\bwhsec_[A-Za-z0-9*]+")

# Tests install a stripe.HTTPClient here (tests/stripe_fixtures.py) so code that calls
# get_stripe_client() talks to the Stripe double; None means stripe-python's default client.
_test_http_client: stripe.HTTPClient | None = None


class StripeProblem(ValueError):
    """A Stripe action that could not be done; the message is one line, safe to show."""


class StripeNotConfigured(StripeProblem):
    def __init__(self, message: str = NOT_CONFIGURED):
        super().__init__(message)


class StripeActionError(StripeProblem):
    """A Stripe API call failed. `cause` is one of: authentication, permission, invalid_price,
    invalid_request, not_found, idempotency, rate_limited, unreachable, stripe_error."""

    def __init__(self, message: str, *, cause: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.cause = cause
        self.status = status
        self.param = param


def make_stripe_client(settings: Settings | None = None, *, http_client: stripe.HTTPClient | None = None,
                       max_network_retries: int = MAX_NETWORK_RETRIES,
                       timeout: float | None = None) -> stripe.StripeClient:
    """`timeout` (seconds per request; stripe-python's default is 80) and `max_network_retries` let a caller
    that must answer quickly (the return page) fail fast."""
    settings = settings or get_settings()
    if not settings.stripe_secret_key:
        raise StripeNotConfigured()
    options: dict = {"max_network_retries": max_network_retries}
    if settings.stripe_api_base:
        options["base_addresses"] = {"api": settings.stripe_api_base}
    http_client = http_client or _test_http_client
    if http_client is None and timeout is not None:
        http_client = stripe.new_default_http_client(timeout=timeout)
    if http_client is not None:
        options["http_client"] = http_client
    return stripe.StripeClient(settings.stripe_secret_key, **options)


def get_stripe_client() -> stripe.StripeClient:
    """A client for the configured account; raises StripeNotConfigured when no key is set."""
    return make_stripe_client(get_settings())


def mask_keys(text: str) -> str:
    """Replace anything that looks like a Stripe key or webhook secret with its masked form."""
    return _KEY_PATTERN.sub(lambda m: mask_secret(m.group(0).replace("*", "")), text)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def classify_stripe_error(exc: Exception) -> str:
    if isinstance(exc, stripe.AuthenticationError):
        return "authentication"
    if isinstance(exc, stripe.PermissionError):
        return "permission"
    if isinstance(exc, stripe.RateLimitError):
        return "rate_limited"
    if isinstance(exc, stripe.APIConnectionError):
        return "unreachable"
    if isinstance(exc, stripe.IdempotencyError):
        return "idempotency"
    if isinstance(exc, stripe.InvalidRequestError):
        if "price" in (exc.param or ""):
            return "invalid_price"
        return "not_found" if exc.code == "resource_missing" else "invalid_request"
    return "stripe_error"


def describe_stripe_error(exc: Exception, *, settings: Settings | None = None) -> str:
    """One line naming the cause of a Stripe error, with every key masked."""
    settings = settings or get_settings()
    said = _one_line(getattr(exc, "user_message", None) or str(exc))
    cause = classify_stripe_error(exc)
    status = getattr(exc, "http_status", None)
    if cause == "authentication":
        text = (f"Stripe authentication failed: the secret key {mask_secret(settings.stripe_secret_key)} was "
                "refused; check STRIPE_SECRET_KEY in config/.env")
    elif cause == "permission":
        text = f"Stripe refused the request: the key lacks a permission ({said})"
    elif cause == "rate_limited":
        text = "Stripe rate limit reached (HTTP 429): too many requests; wait a moment and try again"
    elif cause == "unreachable":
        where = settings.stripe_api_base or "api.stripe.com"
        text = f"Stripe is unreachable: could not connect to {where} (network error); try again later"
    elif cause == "idempotency":
        text = f"Stripe idempotency error: a repeated request carried different parameters ({said})"
    elif cause == "invalid_price":
        kind = "inactive" if "inactive" in said.lower() else "invalid"
        text = f"{kind} price: Stripe rejected {exc.param}: {said}"
    elif isinstance(exc, stripe.InvalidRequestError):
        text = f"Stripe rejected the request{f' ({exc.param})' if exc.param else ''}: {said}"
    elif isinstance(exc, stripe.APIError) and status and status >= 500:
        text = f"Stripe had an internal error (HTTP {status}); try again later"
    else:
        text = f"Stripe error{f' (HTTP {status})' if status else ''}: {said}"
    return mask_keys(_one_line(text))


def action_error(exc: Exception, action: str, *, settings: Settings | None = None) -> StripeActionError:
    return StripeActionError(f"{action} failed: {describe_stripe_error(exc, settings=settings)}",
                             cause=classify_stripe_error(exc), status=getattr(exc, "http_status", None),
                             param=getattr(exc, "param", None))


@contextmanager
def stripe_errors(action: str, *, settings: Settings | None = None) -> Iterator[None]:
    """Turn any stripe.StripeError raised inside into a StripeActionError saying `action` failed."""
    try:
        yield
    except stripe.StripeError as exc:
        # `from None`: the original error's text is already summarised, and must not leak in tracebacks.
        raise action_error(exc, action, settings=settings) from None
