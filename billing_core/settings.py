"""The one settings module: reads config/.env by explicit path, environment overrides it.

`load_settings()` never raises on bad values: it keeps what it could parse and records
each problem, so `check-config` can report every problem at once.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = PROJECT_ROOT / "config" / ".env"
DEFAULT_DATABASE_URL = "sqlite:///data/billing.db"
DEMO_DATABASE_URL = "sqlite:///data/demo.db"

PRICE_SETTINGS = {
    "starter": "STRIPE_PRICE_STARTER",
    "professional": "STRIPE_PRICE_PROFESSIONAL",
    "business": "STRIPE_PRICE_BUSINESS",
    "pack_100": "STRIPE_PRICE_PACK_100",
    "pack_250": "STRIPE_PRICE_PACK_250",
    "pack_500": "STRIPE_PRICE_PACK_500",
    "pack_1000": "STRIPE_PRICE_PACK_1000",
}

SECRET_NAMES = ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "BILLING_API_TOKEN", "BILLING_API_TOKENS")
KNOWN_NAMES = (
    "STRIPE_SECRET_KEY", "STRIPE_PUBLISHABLE_KEY", "STRIPE_WEBHOOK_SECRET", "BASE_URL",
    *PRICE_SETTINGS.values(),
    "DATABASE_URL", "STRIPE_API_BASE", "BILLING_API_TOKEN", "WEBHOOK_HOST", "WEBHOOK_PORT",
    "SUBSCRIPTION_CREDITS_ROLLOVER", "CHECKOUT_LINK_EXPIRY_HOURS", "SUPPORT_ADJUSTMENT_LIMIT",
    "OPERATOR_TIMEZONE", "ADMIN_EMAILS", "SUPPORT_EMAILS",
    # hardening (issue 13): where the dashboard and the credits API listen, named API tokens, operator limits
    "DASHBOARD_ADDRESS", "API_HOST", "API_PORT", "BILLING_API_TOKENS", "SESSION_IDLE_MINUTES",
    "SUPPORT_DAILY_ADJUSTMENT_CAP", "DASHBOARD_TRUSTED_PROXIES",
    *("WEBHOOK_WORKERS", "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_TIMEOUT"),  # deployment: workers, connections
)
SECRET_KEY_MODES = {"sk_test_": "test", "sk_live_": "live", "rk_test_": "test", "rk_live_": "live"}
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting that can't be used; the message names the setting."""


@dataclass(frozen=True)
class Problem:
    level: str  # "error" or "warning"
    setting: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.setting}: {self.message}"


@dataclass(frozen=True)
class Settings:
    stripe_secret_key: str = field(default="", repr=False)
    stripe_publishable_key: str = ""
    stripe_webhook_secret: str = field(default="", repr=False)
    base_url: str = "http://localhost:5000"
    price_ids: dict[str, str] = field(default_factory=dict)
    database_url_setting: str = field(default="", repr=False)  # may hold a password
    stripe_api_base: str = ""
    billing_api_token: str = field(default="", repr=False)
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 5000
    subscription_credits_rollover: bool = False
    checkout_link_expiry_hours: int = 24
    support_adjustment_limit: int = 500
    operator_timezone: str = "UTC"
    admin_emails: tuple[str, ...] = ()
    support_emails: tuple[str, ...] = ()
    dashboard_address: str = "127.0.0.1"
    dashboard_trusted_proxies: int = 0  # proxies in front of the dashboard whose X-Forwarded-For is believed
    api_host: str = ""  # empty: the credits API is served on the webhook listener
    api_port: int | None = None
    billing_api_tokens: str = field(default="", repr=False)  # name:token,name:token
    session_idle_minutes: int = 30
    support_daily_adjustment_cap: int = 2000
    # deployment: each worker process keeps its own pool of up to db_pool_size + db_max_overflow connections
    webhook_workers: int = 1
    db_pool_size: int = 5
    db_max_overflow: int = 5
    db_pool_timeout: float = 3.0  # seconds to wait for a free connection before answering "busy"
    env_file: str = ""
    parse_problems: tuple[Problem, ...] = ()

    @property
    def demo_mode(self) -> bool:
        """Demo mode is on exactly when neither a secret key nor DATABASE_URL is configured."""
        return not self.stripe_secret_key and not self.database_url_setting

    @property
    def database_url(self) -> str:
        if self.database_url_setting:
            return resolve_sqlite_path(self.database_url_setting)
        return resolve_sqlite_path(DEMO_DATABASE_URL if self.demo_mode else DEFAULT_DATABASE_URL)

    @property
    def connections_per_process(self) -> int:
        return self.db_pool_size + self.db_max_overflow

    @property
    def stripe_configured(self) -> bool:
        return bool(self.stripe_secret_key)

    @property
    def stripe_mode(self) -> str:
        """'live' or 'test' by the secret key's prefix; 'demo' with no key; 'invalid' for anything else."""
        if not self.stripe_secret_key:
            return "demo"
        for prefix, mode in SECRET_KEY_MODES.items():
            if self.stripe_secret_key.startswith(prefix):
                return mode
        return "invalid"

    @property
    def livemode(self) -> bool:
        return self.stripe_mode == "live"

    @property
    def webhook_secrets(self) -> list[str]:
        return [s.strip() for s in self.stripe_webhook_secret.split(",") if s.strip()]

    def price_id(self, item_key: str) -> str:
        return self.price_ids.get(item_key, "")

    @property
    def api_tokens(self) -> dict[str, str]:
        """Credits-API tokens by name: BILLING_API_TOKENS' name:token pairs, and BILLING_API_TOKEN as "default"."""
        return parse_api_tokens(self.billing_api_tokens, self.billing_api_token)[0]

    @property
    def api_listener_separate(self) -> bool:
        """True when API_HOST or API_PORT gives the credits API its own listener."""
        return bool(self.api_host) or self.api_port is not None

    @property
    def api_listener(self) -> tuple[str, int]:
        """The credits API's own (host, port): API_HOST (default WEBHOOK_HOST), API_PORT (default 5001)."""
        return self.api_host or self.webhook_host, self.api_port or DEFAULT_API_PORT


DEFAULT_API_PORT = 5001
API_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MIN_API_TOKEN_LENGTH = 16


def parse_api_tokens(named: str, single: str = "") -> tuple[dict[str, str], list[str]]:
    """({name: token}, problems) from `name:token,name:token` plus the single BILLING_API_TOKEN ("default").
    Problems never contain a token."""
    tokens: dict[str, str] = {}
    problems: list[str] = []
    for position, pair in enumerate((p.strip() for p in named.split(",")), start=1):
        if not pair:
            continue
        name, sep, token = (part.strip() for part in pair.partition(":"))
        if not sep or not token:
            problems.append(f"entry {position} must be name:token")
        elif not API_TOKEN_NAME.match(name):
            problems.append(f"entry {position}: a token name is 1-100 letters, digits, . _ - (got {shown(name)!r})")
        elif name in tokens or (name == "default" and single):
            problems.append(f"entry {position}: the name {name!r} is used twice")
        elif len(token) < MIN_API_TOKEN_LENGTH:
            problems.append(f"entry {position} ({name}): the token must be at least {MIN_API_TOKEN_LENGTH} characters")
        else:
            tokens[name] = token
    if single:
        tokens = {"default": single, **tokens}
    return tokens, problems


def resolve_sqlite_path(url: str) -> str:
    """Relative SQLite paths are relative to the project, not to the current directory."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////"):
        rest = url[len(prefix):]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str(PROJECT_ROOT / rest)
    return url


def mask_secret(value: str) -> str:
    """Show a secret as its kind and last four characters: `sk_test_…a1b2`."""
    if not value:
        return "(not set)"
    parts = value.split("_")
    prefix = ""
    if len(parts) >= 3 and parts[1] in ("test", "live"):
        prefix = f"{parts[0]}_{parts[1]}_"
    elif len(parts) >= 2 and len(parts[0]) <= 6:
        prefix = f"{parts[0]}_"
    tail = value[-4:] if len(value) >= 12 else ""
    return f"{prefix}…{tail}"


SECRET_LOOKING = re.compile(r"(sk|rk|pk)_(test|live)_|whsec_")
PLAIN_ID = re.compile(r"[a-z]+_[A-Za-z0-9]{1,60}")


def shown(value: str) -> str:
    """A setting's value as it may appear in a message: plain IDs and URLs as they are (without a URL's
    password), anything that looks like a key or secret (for instance pasted into the wrong setting) masked."""
    if SECRET_LOOKING.search(value):
        return mask_secret(value)
    if PLAIN_ID.fullmatch(value) or "://" in value:
        return mask_url_password(value)
    return value if len(value) <= 40 else mask_secret(value)


def mask_url_password(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def _env_file_path(environ: dict[str, str]) -> Path:
    named = environ.get("BILLING_ENV_FILE")
    return Path(named) if named else DEFAULT_ENV_FILE


def read_raw(environ: dict[str, str] | None = None) -> tuple[dict[str, str], Path]:
    environ = dict(os.environ if environ is None else environ)
    path = _env_file_path(environ)
    values: dict[str, str] = {}
    if path.is_file():
        values = {k: (v or "") for k, v in dotenv_values(path).items()}
    for name in KNOWN_NAMES:
        if name in environ:
            values[name] = environ[name]
    return {k: v.strip() for k, v in values.items()}, path


def _parse_bool(raw: dict, name: str, default: bool, problems: list) -> bool:
    value = raw.get(name, "").lower()
    if name not in raw or value == "":
        return default
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    problems.append(Problem("error", name, f"must be true or false, not {shown(raw[name])!r}"))
    return default


def _parse_int(raw: dict, name: str, default: int, problems: list, *, low: int, high: int) -> int:
    if not raw.get(name):
        return default
    try:
        value = int(raw[name])
    except ValueError:
        problems.append(Problem("error", name, f"must be a whole number, not {shown(raw[name])!r}"))
        return default
    if not low <= value <= high:
        problems.append(Problem("error", name, f"must be between {low} and {high}, not {value}"))
        return default
    return value


def _parse_seconds(raw: dict, name: str, default: float, problems: list, *, low: float, high: float) -> float:
    if not raw.get(name):
        return default
    try:
        value = float(raw[name])
    except ValueError:
        problems.append(Problem("error", name, f"must be a number of seconds, not {shown(raw[name])!r}"))
        return default
    if not low <= value <= high:
        problems.append(Problem("error", name, f"must be between {low:g} and {high:g} seconds, not {value:g}"))
        return default
    return value


def _emails(raw: dict, name: str) -> tuple[str, ...]:
    return tuple(e.strip().lower() for e in raw.get(name, "").split(",") if e.strip())


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    raw, path = read_raw(environ)
    problems: list[Problem] = []
    return Settings(
        stripe_secret_key=raw.get("STRIPE_SECRET_KEY", ""),
        stripe_publishable_key=raw.get("STRIPE_PUBLISHABLE_KEY", ""),
        stripe_webhook_secret=raw.get("STRIPE_WEBHOOK_SECRET", ""),
        base_url=(raw.get("BASE_URL") or "http://localhost:5000").rstrip("/"),
        price_ids={key: raw.get(name, "") for key, name in PRICE_SETTINGS.items()},
        database_url_setting=raw.get("DATABASE_URL", ""),
        stripe_api_base=raw.get("STRIPE_API_BASE", "").rstrip("/"),
        billing_api_token=raw.get("BILLING_API_TOKEN", ""),
        webhook_host=raw.get("WEBHOOK_HOST") or "127.0.0.1",
        webhook_port=_parse_int(raw, "WEBHOOK_PORT", 5000, problems, low=1, high=65535),
        subscription_credits_rollover=_parse_bool(raw, "SUBSCRIPTION_CREDITS_ROLLOVER", False, problems),
        checkout_link_expiry_hours=_parse_int(raw, "CHECKOUT_LINK_EXPIRY_HOURS", 24, problems, low=1, high=24),
        support_adjustment_limit=_parse_int(raw, "SUPPORT_ADJUSTMENT_LIMIT", 500, problems, low=0, high=10_000_000),
        operator_timezone=raw.get("OPERATOR_TIMEZONE") or "UTC",
        admin_emails=_emails(raw, "ADMIN_EMAILS"),
        support_emails=_emails(raw, "SUPPORT_EMAILS"),
        dashboard_address=raw.get("DASHBOARD_ADDRESS") or "127.0.0.1",
        dashboard_trusted_proxies=_parse_int(raw, "DASHBOARD_TRUSTED_PROXIES", 0, problems, low=0, high=5),
        api_host=raw.get("API_HOST", ""),
        api_port=_parse_int(raw, "API_PORT", None, problems, low=1, high=65535),
        billing_api_tokens=raw.get("BILLING_API_TOKENS", ""),
        session_idle_minutes=_parse_int(raw, "SESSION_IDLE_MINUTES", 30, problems, low=1, high=24 * 60),
        support_daily_adjustment_cap=_parse_int(raw, "SUPPORT_DAILY_ADJUSTMENT_CAP", 2000, problems, low=0,
                                                high=10_000_000),
        webhook_workers=_parse_int(raw, "WEBHOOK_WORKERS", 1, problems, low=1, high=64),
        db_pool_size=_parse_int(raw, "DB_POOL_SIZE", 5, problems, low=1, high=1000),
        db_max_overflow=_parse_int(raw, "DB_MAX_OVERFLOW", 5, problems, low=0, high=1000),
        db_pool_timeout=_parse_seconds(raw, "DB_POOL_TIMEOUT", 3.0, problems, low=0.05, high=60),
        env_file=str(path),
        parse_problems=tuple(problems),
    )


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1")


def _is_local_host(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0") or host.endswith(".localhost")


def check_config(settings: Settings) -> list[Problem]:
    """Every problem in the configuration, errors and warnings, in plain words."""
    problems = list(settings.parse_problems)
    sk, pk = settings.stripe_secret_key, settings.stripe_publishable_key
    key_mode = settings.stripe_mode if settings.stripe_mode in ("test", "live") else None
    if sk:
        if key_mode is None:
            kind = "a publishable key" if sk.startswith("pk_") else f"not a Stripe secret key ({mask_secret(sk)})"
            problems.append(Problem("error", "STRIPE_SECRET_KEY",
                                    f"must start with sk_test_, sk_live_, rk_test_ or rk_live_; this is {kind}"))
    else:
        problems.append(Problem("warning", "STRIPE_SECRET_KEY",
                                "not set: Stripe actions are off" + (" and the console runs in demo mode"
                                                                     if settings.demo_mode else "")))
    if pk:
        pk_mode = "test" if pk.startswith("pk_test_") else "live" if pk.startswith("pk_live_") else None
        if pk_mode is None:
            problems.append(Problem("error", "STRIPE_PUBLISHABLE_KEY",
                                    f"must start with pk_test_ or pk_live_ (got {mask_secret(pk)})"))
        elif key_mode and pk_mode != key_mode:
            problems.append(Problem("error", "STRIPE_PUBLISHABLE_KEY",
                                    f"is a {pk_mode}-mode key but STRIPE_SECRET_KEY is a {key_mode}-mode key"))
    for item_key, name in PRICE_SETTINGS.items():
        value = settings.price_ids.get(item_key, "")
        if not value:
            if sk:
                problems.append(Problem("warning", name, f"not set: no checkout links for {item_key} "
                                        "(run `python -m billing_core sync-catalog --write-env`)"))
        elif value.startswith("prod_"):
            problems.append(Problem("error", name, f"{shown(value)} is a product ID, not a price ID; "
                                    "use the price ID (price_...) from the product's pricing section"))
        elif not value.startswith("price_"):
            problems.append(Problem("error", name, f"must be a price ID starting with price_ (got {shown(value)!r})"))
    wh = settings.stripe_webhook_secret
    if wh:
        for secret in settings.webhook_secrets:
            if not secret.startswith("whsec_"):
                problems.append(Problem("error", "STRIPE_WEBHOOK_SECRET",
                                        f"each secret must start with whsec_ (got {mask_secret(secret)})"))
    elif sk:
        problems.append(Problem("warning", "STRIPE_WEBHOOK_SECRET", "not set: the webhook sidecar refuses all events"))
    parsed = urlparse(settings.base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        problems.append(Problem("error", "BASE_URL", f"must be an absolute http(s) URL, not {shown(settings.base_url)!r}"))
    elif key_mode == "live" and (parsed.scheme == "http" or _is_local_host(parsed.hostname)):
        problems.append(Problem("warning", "BASE_URL",
                                f"{shown(settings.base_url)} with live keys: customers can't reach an http:// "
                                "or localhost address; use your public https URL"))
    if settings.stripe_api_base:
        api = urlparse(settings.stripe_api_base)
        if api.scheme not in ("http", "https") or not api.hostname:
            problems.append(Problem("error", "STRIPE_API_BASE",
                                    f"must be an absolute http(s) URL, not {shown(settings.stripe_api_base)!r}"))
    db = settings.database_url_setting
    if db and not (db.startswith("sqlite:///") or db.startswith("postgresql")):
        problems.append(Problem("error", "DATABASE_URL",
                                "must start with sqlite:/// or postgresql:// (postgresql+psycopg://)"))
    if not _is_local_host(settings.dashboard_address) or settings.dashboard_address == "0.0.0.0":
        problems.append(Problem("warning", "DASHBOARD_ADDRESS",
                                f"the dashboard listens on {shown(settings.dashboard_address)}: keep it behind an "
                                "authenticating proxy or OIDC (see the README's deployment section)"))
    if settings.api_tokens and not settings.api_listener_separate and not _is_loopback(settings.webhook_host):
        problems.append(Problem("warning", "API_PORT",
                                f"the credits API shares the webhook listener on {shown(settings.webhook_host)}, "
                                "which Stripe must reach; set API_HOST/API_PORT to serve it on a private address"))
    for message in parse_api_tokens(settings.billing_api_tokens)[1]:
        problems.append(Problem("error", "BILLING_API_TOKENS", message))
    if settings.api_listener_separate and settings.api_listener == (settings.webhook_host, settings.webhook_port):
        problems.append(Problem("error", "API_PORT", f"{settings.webhook_port} is the webhook listener's port; give "
                                "the credits API its own port (or leave API_HOST and API_PORT unset to share it)"))
    if settings.webhook_workers > 1 and settings.api_listener_separate:
        problems.append(Problem("error", "WEBHOOK_WORKERS", f"{settings.webhook_workers} workers with the credits API "
                                "on its own listener (API_HOST/API_PORT) is not supported yet: run one worker, or "
                                "leave API_HOST/API_PORT unset"))
    if settings.webhook_workers > 1 and settings.database_url.startswith("sqlite"):
        problems.append(Problem("error", "WEBHOOK_WORKERS", f"{settings.webhook_workers} workers need PostgreSQL; "
                                "SQLite admits one writer at a time, so run one worker (WEBHOOK_WORKERS=1)"))
    try:
        from zoneinfo import ZoneInfo
        ZoneInfo(settings.operator_timezone)
    except Exception:
        problems.append(Problem("error", "OPERATOR_TIMEZONE",
                                f"{settings.operator_timezone!r} is not a known time zone (e.g. Europe/Berlin)"))
    return problems


_cached: Settings | None = None


def get_settings() -> Settings:
    """Settings for this process, read once."""
    global _cached
    if _cached is None:
        _cached = load_settings()
    return _cached


def reset_settings_cache() -> None:
    global _cached
    _cached = None
