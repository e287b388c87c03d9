"""The client the DevOps Agent imports to read and spend a user's credits.

    from billing_core.credits_client import CreditsClient, InsufficientCredits

    with CreditsClient("http://127.0.0.1:5000", token=os.environ["BILLING_API_TOKEN"]) as credits:
        credits.balance("user_42")["spendable_balance"]
        credits.consume("user_42", 5, reference="run-8f2c/step-3")

A spend is applied once per (user, reference): after a timeout or a dropped connection, retry with
the same reference; it either returns the original answer or spends for the first time.
The token is sent only in the Authorization header and never appears in messages or reprs.
"""
from __future__ import annotations

from urllib.parse import quote

import httpx


class CreditsError(Exception):
    """Any refusal or failure of the credits API; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class InsufficientCredits(CreditsError):
    """402: the spendable balance is short, or the account is flagged and spending is paused."""


class AccountNotFound(CreditsError):
    """404: no account for this user id."""


class ReferenceConflict(CreditsError):
    """409: the reference was already used for a different amount."""


class Unauthorized(CreditsError):
    """401: the token is missing or wrong."""


class InvalidRequest(CreditsError):
    """422 (or 413): the request itself is wrong; retrying won't help."""


class ApiUnavailable(CreditsError):
    """503 (or 502/504 from a proxy), a connection failure or a timeout: retrying later (with the same reference) is safe."""


ERRORS_BY_STATUS = {
    401: Unauthorized, 402: InsufficientCredits, 404: AccountNotFound, 409: ReferenceConflict,
    413: InvalidRequest, 422: InvalidRequest, 502: ApiUnavailable, 503: ApiUnavailable, 504: ApiUnavailable,
}


class CreditsClient:
    def __init__(self, base_url: str, token: str, timeout: float = 5.0, *, transport: httpx.BaseTransport | None = None):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if not token:
            raise ValueError("a token (BILLING_API_TOKEN) is required")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})

    def __repr__(self) -> str:
        return f"CreditsClient({self.base_url!r}, token=***, timeout={self.timeout})"

    def __enter__(self) -> "CreditsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def balance(self, user_id: str) -> dict:
        """The account summary: balance, spendable_balance, tier, subscription_status, flagged, breakdown..."""
        return self._request("GET", _account_path(user_id))

    def consume(self, user_id: str, credits: int, reference: str) -> dict:
        """Spend `credits` once for `reference`; returns {user_id, balance, spendable_balance, credits, reference}."""
        return self._request("POST", _account_path(user_id) + "/consume",
                             json={"credits": credits, "reference": reference})

    def _request(self, method: str, path: str, *, json: dict | None = None) -> dict:
        where = f"{method} {self.base_url}{path}"
        try:
            response = self._http.request(method, path, json=json)
        except httpx.TimeoutException:
            raise ApiUnavailable(f"{where}: no answer within {self.timeout} s") from None
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{where}: cannot reach the credits API ({type(exc).__name__})") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 200 and isinstance(body, dict):
            return body
        message = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), str) else None
        message = message or f"unexpected answer: HTTP {response.status_code}"
        error_class = ERRORS_BY_STATUS.get(response.status_code, CreditsError)
        raise error_class(f"{where}: {message}", status=response.status_code)


def _account_path(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise InvalidRequest("user_id must be a non-empty string")
    return "/api/accounts/" + quote(user_id, safe="")
