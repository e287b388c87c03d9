import subprocess
import sys
from pathlib import Path

import pytest

from billing_core.settings import (PROJECT_ROOT, check_config, load_settings, mask_secret)

SK_TEST = "sk_test_51AbCdEfGhIjKlMnOpQrStUvWxa1b2"
SK_LIVE = "sk_live_51AbCdEfGhIjKlMnOpQrStUvWxz9y8"
PK_TEST = "pk_test_51AbCdEfGhIjKlMnOpQrStUvWx0000"
PK_LIVE = "pk_live_51AbCdEfGhIjKlMnOpQrStUvWx1111"
WHSEC = "whsec_0123456789abcdefABCDEF0123456789"


def write_env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test.env"
    path.write_text(text)
    return path


def settings_from(tmp_path, text="", **environ):
    path = write_env(tmp_path, text)
    return load_settings({"BILLING_ENV_FILE": str(path), **environ})


def problems_by_setting(settings):
    found = {}
    for problem in check_config(settings):
        found.setdefault(problem.setting, []).append(problem)
    return found


def test_reads_env_file_by_explicit_path(tmp_path):
    s = settings_from(tmp_path, f"STRIPE_SECRET_KEY={SK_TEST}\nSTRIPE_PRICE_STARTER=price_123\nWEBHOOK_PORT=5050\n")
    assert s.stripe_secret_key == SK_TEST
    assert s.price_id("starter") == "price_123"
    assert s.webhook_port == 5050
    assert s.env_file.endswith("test.env")


def test_environment_overrides_the_file(tmp_path):
    s = settings_from(tmp_path, "BASE_URL=https://file.example.com\n", BASE_URL="https://env.example.com")
    assert s.base_url == "https://env.example.com"


def test_missing_env_file_is_not_an_error(tmp_path):
    s = load_settings({"BILLING_ENV_FILE": str(tmp_path / "absent.env"), "STRIPE_SECRET_KEY": SK_TEST})
    assert s.stripe_secret_key == SK_TEST
    assert s.webhook_host == "127.0.0.1" and s.webhook_port == 5000
    assert s.subscription_credits_rollover is False


def test_default_env_file_is_config_dot_env():
    s = load_settings({})
    assert Path(s.env_file) == PROJECT_ROOT / "config" / ".env"


def test_demo_mode_exactly_when_no_key_and_no_database_url(tmp_path):
    assert settings_from(tmp_path).demo_mode
    assert settings_from(tmp_path).database_url.endswith("data/demo.db")
    with_key = settings_from(tmp_path, STRIPE_SECRET_KEY=SK_TEST)
    assert not with_key.demo_mode and with_key.database_url.endswith("data/billing.db")
    with_db = settings_from(tmp_path, DATABASE_URL="sqlite:////tmp/x.db")
    assert not with_db.demo_mode and with_db.database_url == "sqlite:////tmp/x.db"


def test_relative_sqlite_path_is_relative_to_the_project(tmp_path):
    s = settings_from(tmp_path, DATABASE_URL="sqlite:///data/other.db")
    assert s.database_url == f"sqlite:///{PROJECT_ROOT}/data/other.db"


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("yes", True), ("false", False), ("0", False)])
def test_rollover_flag(tmp_path, value, expected):
    assert settings_from(tmp_path, SUBSCRIPTION_CREDITS_ROLLOVER=value).subscription_credits_rollover is expected


def test_unparseable_values_are_reported_not_raised(tmp_path):
    s = settings_from(tmp_path, WEBHOOK_PORT="http", SUBSCRIPTION_CREDITS_ROLLOVER="maybe")
    found = problems_by_setting(s)
    assert "whole number" in found["WEBHOOK_PORT"][0].message
    assert "true or false" in found["SUBSCRIPTION_CREDITS_ROLLOVER"][0].message
    assert s.webhook_port == 5000


def test_valid_configuration_has_no_errors(tmp_path):
    prices = "".join(f"{name}=price_{i}abc\n" for i, name in enumerate([
        "STRIPE_PRICE_STARTER", "STRIPE_PRICE_PROFESSIONAL", "STRIPE_PRICE_BUSINESS", "STRIPE_PRICE_PACK_100",
        "STRIPE_PRICE_PACK_250", "STRIPE_PRICE_PACK_500", "STRIPE_PRICE_PACK_1000"]))
    s = settings_from(tmp_path, f"STRIPE_SECRET_KEY={SK_TEST}\nSTRIPE_PUBLISHABLE_KEY={PK_TEST}\n"
                                f"STRIPE_WEBHOOK_SECRET={WHSEC}\nBASE_URL=http://localhost:5000\n{prices}")
    assert check_config(s) == []


def test_every_problem_is_reported_at_once(tmp_path):
    s = settings_from(tmp_path, STRIPE_SECRET_KEY="pk_test_oops1234567890", STRIPE_PUBLISHABLE_KEY="nope",
                      STRIPE_WEBHOOK_SECRET="secret_abc", BASE_URL="localhost:5000",
                      STRIPE_PRICE_STARTER="prod_ABC", STRIPE_PRICE_PACK_100="plan_x")
    found = problems_by_setting(s)
    assert "publishable key" in found["STRIPE_SECRET_KEY"][0].message
    assert found["STRIPE_PUBLISHABLE_KEY"][0].level == "error"
    assert "whsec_" in found["STRIPE_WEBHOOK_SECRET"][0].message
    assert "absolute http(s) URL" in found["BASE_URL"][0].message
    assert "product ID, not a price ID" in found["STRIPE_PRICE_STARTER"][0].message
    assert "price_" in found["STRIPE_PRICE_PACK_100"][0].message
    assert all(p.level == "error" for key in ("STRIPE_SECRET_KEY", "BASE_URL") for p in found[key])


@pytest.mark.parametrize("key", ["sk_test_abc12345678", "sk_live_abc12345678", "rk_test_abc12345678", "rk_live_abc12345678"])
def test_accepted_secret_key_prefixes(tmp_path, key):
    assert "STRIPE_SECRET_KEY" not in problems_by_setting(settings_from(tmp_path, STRIPE_SECRET_KEY=key))


def test_publishable_key_mode_must_match(tmp_path):
    found = problems_by_setting(settings_from(tmp_path, STRIPE_SECRET_KEY=SK_TEST, STRIPE_PUBLISHABLE_KEY=PK_LIVE))
    assert "live-mode key but STRIPE_SECRET_KEY is a test-mode key" in found["STRIPE_PUBLISHABLE_KEY"][0].message


def test_several_webhook_secrets_are_accepted(tmp_path):
    s = settings_from(tmp_path, STRIPE_SECRET_KEY=SK_TEST, STRIPE_WEBHOOK_SECRET=f"{WHSEC}, whsec_second0000000000")
    assert s.webhook_secrets == [WHSEC, "whsec_second0000000000"]
    assert "STRIPE_WEBHOOK_SECRET" not in problems_by_setting(s)


@pytest.mark.parametrize("base_url", ["http://billing.example.com", "https://localhost:8443"])
def test_live_keys_with_http_or_localhost_base_url_warn(tmp_path, base_url):
    found = problems_by_setting(settings_from(tmp_path, STRIPE_SECRET_KEY=SK_LIVE, BASE_URL=base_url))
    assert [p.level for p in found["BASE_URL"]] == ["warning"]


def test_live_keys_with_public_https_base_url_are_fine(tmp_path):
    found = problems_by_setting(settings_from(tmp_path, STRIPE_SECRET_KEY=SK_LIVE, BASE_URL="https://billing.example.com"))
    assert "BASE_URL" not in found


def test_mask_secret_shows_kind_and_last_four():
    assert mask_secret(SK_TEST) == "sk_test_…a1b2"
    assert mask_secret(WHSEC) == "whsec_…6789"
    assert mask_secret("") == "(not set)"
    assert mask_secret("short") == "…"


def run_cli(*args, env_file: Path, extra_env=None):
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env.update({"BILLING_ENV_FILE": str(env_file), **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "billing_core", *args], capture_output=True, text=True,
                          env=env, cwd=PROJECT_ROOT, timeout=60)


def test_check_config_cli_exits_nonzero_on_errors_and_never_prints_secrets(tmp_path):
    env_file = write_env(tmp_path, f"STRIPE_SECRET_KEY=xk_bad_{SK_TEST[8:]}\nSTRIPE_WEBHOOK_SECRET=bad{WHSEC}\n"
                                   "STRIPE_PRICE_STARTER=prod_123\nDATABASE_URL=sqlite:////tmp/never.db\n")
    result = run_cli("check-config", env_file=env_file)
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "product ID, not a price ID" in out and "STRIPE_SECRET_KEY" in out and "whsec_" in out
    assert SK_TEST[8:] not in out and WHSEC not in out


def test_check_config_cli_passes_on_good_config(tmp_path):
    env_file = write_env(tmp_path, f"STRIPE_SECRET_KEY={SK_TEST}\nSTRIPE_WEBHOOK_SECRET={WHSEC}\n"
                                   "DATABASE_URL=sqlite:////tmp/never.db\n")
    result = run_cli("check-config", env_file=env_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test mode" in result.stdout and SK_TEST not in result.stdout


def test_settings_repr_never_shows_secrets(tmp_path):
    s = settings_from(tmp_path, STRIPE_SECRET_KEY=SK_TEST, STRIPE_WEBHOOK_SECRET=WHSEC, BILLING_API_TOKEN="tok_secret_value",
                      DATABASE_URL="postgresql://billing:hunter2@db/billing")
    text = repr(s)
    assert SK_TEST not in text and WHSEC not in text and "tok_secret_value" not in text and "hunter2" not in text


def test_an_unrecognised_secret_key_is_neither_test_nor_live(tmp_path):
    s = settings_from(tmp_path, STRIPE_SECRET_KEY="sk_prod_abcdefghijklmnop")
    assert s.stripe_mode == "invalid" and not s.livemode
    assert problems_by_setting(s)["STRIPE_SECRET_KEY"][0].level == "error"


@pytest.mark.parametrize("name", ["STRIPE_PRICE_STARTER", "BASE_URL", "WEBHOOK_PORT", "STRIPE_API_BASE"])
def test_a_secret_pasted_into_the_wrong_setting_is_never_echoed(tmp_path, name):
    s = settings_from(tmp_path, STRIPE_SECRET_KEY=SK_TEST, **{name: f"prod_{SK_TEST}"})
    messages = " ".join(str(p) for p in check_config(s))
    assert name in messages
    assert SK_TEST not in messages and SK_TEST[8:] not in messages
