"""dashboard rollups kept by triggers: ledger_hourly, payment_hourly, subscription_period, mrr_hourly;
indexes for the dashboard (credit_lot by expiry time, account by balance, subscription by status and tier)

Back-fills them from the existing rows: the hourly sums by GROUP BY, and the subscription spans by
replaying the subscription grants (in the order their invoices were created) and then each
subscription's current status through the very triggers that keep them afterwards.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-29
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PERIOD_KINDS = "('subscription_grant', 'upgrade_topup', 'payment_link')"
ENDED = "('canceled', 'incomplete_expired')"
PAST_DUE = "('past_due', 'unpaid')"
FAR_FUTURE = "9999-12-31 00:00:00.000000"
PG_HOUR = "to_char(({0}) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24')"
PG_SHARD = "(hashtext(COALESCE({0}, '')) & 15)"


def _run(sql: str) -> None:
    op.get_bind().exec_driver_sql(sql)


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    op.create_index("ix_account_balance", "account", ["balance"])
    op.create_index("ix_subscription_status_tier", "subscription", ["status", "tier"])
    op.create_index("ix_credit_lot_expiry", "credit_lot", ["expires_at", "remaining"])
    # open lots by expiry, covering: lots past expiry not yet closed (Home) and the expiring-credits forecast
    op.create_index("ix_credit_lot_open_expiry", "credit_lot", ["expires_at", "remaining", "source", "user_id"],
                    sqlite_where=sa.text("closed = 0"), postgresql_where=sa.text("closed = false"))
    _create_tables()
    _backfill_hourly()
    if _sqlite():
        _sqlite_triggers()
    else:
        _postgres_triggers()
    _backfill_subscription_periods()
    if not _sqlite():
        for table in ("ledger_hourly", "payment_hourly", "subscription_period", "mrr_hourly"):
            _run(f"ANALYZE {table}")


def _create_tables() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        "ledger_hourly",
        sa.Column("hour", text(length=13), nullable=False),
        sa.Column("kind", text(length=30), nullable=False),
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("entries", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "kind", "shard"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "payment_hourly",
        sa.Column("hour", text(length=13), nullable=False),
        sa.Column("kind", text(length=10), nullable=False),
        sa.Column("currency", text(length=3), nullable=False),
        sa.Column("collected", sa.Boolean(), nullable=False),
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("payments", sa.BigInteger(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("refunded_cents", sa.BigInteger(), nullable=False),
        sa.Column("disputed_lost_cents", sa.BigInteger(), nullable=False),
        sa.Column("credits_granted", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "kind", "currency", "collected", "shard"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "subscription_period",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subscription_id", text(length=100), nullable=False),
        sa.Column("user_id", text(length=200), nullable=False),
        sa.Column("payment_id", sa.Integer(), nullable=True),
        sa.Column("state", text(length=20), nullable=False),
        sa.Column("source", text(length=30), nullable=False),
        sa.Column("starts_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("ends_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", text(length=3), nullable=False),
        sa.Column("is_new", sa.Boolean(), nullable=False),
        sa.Column("has_successor", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_subscription_period_subscription", "subscription_period", ["subscription_id", "starts_at"])
    op.create_index("ix_subscription_period_payment", "subscription_period", ["payment_id"])
    op.create_index("ix_subscription_period_churn", "subscription_period",
                    ["has_successor", "ends_at", "starts_at", "currency", "amount_cents"])
    op.create_table(
        "mrr_hourly",
        sa.Column("hour", text(length=13), nullable=False),
        sa.Column("currency", text(length=3), nullable=False),
        sa.Column("state", text(length=20), nullable=False),
        sa.Column("change_cents", sa.BigInteger(), nullable=False),
        sa.Column("new_cents", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "currency", "state"),
        sqlite_with_rowid=False,
    )


def _hour(column: str) -> str:
    return f"substr({column}, 1, 13)" if _sqlite() else PG_HOUR.format(column)


def _shard(column: str) -> str:
    return "0" if _sqlite() else PG_SHARD.format(column)


def _backfill_hourly() -> None:
    _run(f"""INSERT INTO ledger_hourly (hour, kind, shard, credits, entries)
             SELECT {_hour('created_at')}, kind, {_shard('user_id')}, SUM(credits), COUNT(*)
             FROM ledger_entry GROUP BY 1, 2, 3""")
    _run(f"""INSERT INTO payment_hourly (hour, kind, currency, collected, shard, payments, amount_cents,
                                         refunded_cents, disputed_lost_cents, credits_granted)
             SELECT {_hour('created_at')}, COALESCE(kind, 'other'), currency, status NOT IN ('unpaid', 'failed'),
                    {_shard('user_id')}, COUNT(*), SUM(amount_cents), SUM(amount_refunded),
                    SUM(amount_disputed_lost), SUM(credits_granted)
             FROM payment GROUP BY 1, 2, 3, 4, 5""")


def _backfill_subscription_periods() -> None:
    """Replay through the triggers: grant entries in invoice order, then every subscription's status."""
    sqlite = _sqlite()
    _run("CREATE TABLE rollup_replay_entry (id INTEGER PRIMARY KEY, kind VARCHAR(30), payment_id INTEGER, "
         "subscription_id VARCHAR(100), period_end BIGINT, user_id VARCHAR(200))")
    timestamp = "TIMESTAMP" if sqlite else "TIMESTAMP WITH TIME ZONE"
    _run(f"CREATE TABLE rollup_replay_status (n INTEGER PRIMARY KEY, id VARCHAR(100), user_id VARCHAR(200), "
         f"status VARCHAR(40), old_status VARCHAR(40), updated_at {timestamp})")
    if sqlite:
        _run(_sqlite_period_from_ledger("rollup_replay_entry", "subscription_period_replay_entry"))
        _run(_sqlite_period_status("rollup_replay_status", "subscription_period_replay_status", "NEW.old_status",
                                   event="INSERT"))
    else:
        _run("CREATE TRIGGER subscription_period_replay_entry AFTER INSERT ON rollup_replay_entry "
             "FOR EACH ROW EXECUTE FUNCTION rollup_subscription_period_from_ledger()")
        _run("CREATE TRIGGER subscription_period_replay_status AFTER INSERT ON rollup_replay_status "
             "FOR EACH ROW EXECUTE FUNCTION rollup_subscription_period_status()")
    _run(f"""INSERT INTO rollup_replay_entry (id, kind, payment_id, subscription_id, period_end, user_id)
             SELECT ROW_NUMBER() OVER (ORDER BY p.created_at, e.id), e.kind, e.payment_id, e.subscription_id,
                    e.period_end, e.user_id
             FROM ledger_entry e JOIN payment p ON p.id = e.payment_id
             WHERE e.kind IN {PERIOD_KINDS} AND e.subscription_id IS NOT NULL AND e.period_end IS NOT NULL
             ORDER BY p.created_at, e.id""")
    _run(f"""INSERT INTO rollup_replay_status (n, id, user_id, status, old_status, updated_at)
             SELECT ROW_NUMBER() OVER (ORDER BY updated_at, id), id, user_id, status, 'active', updated_at
             FROM subscription WHERE status IN {ENDED} OR status IN {PAST_DUE}
             ORDER BY updated_at, id""")
    _run("DROP TABLE rollup_replay_entry")
    _run("DROP TABLE rollup_replay_status")


# --- SQLite ---------------------------------------------------------------------------------------

def _sqlite_upsert_ledger() -> str:
    return """INSERT INTO ledger_hourly (hour, kind, shard, credits, entries)
              VALUES (substr(NEW.created_at, 1, 13), NEW.kind, 0, NEW.credits, 1)
              ON CONFLICT (hour, kind, shard) DO UPDATE SET credits = credits + excluded.credits,
                                                             entries = entries + excluded.entries;"""


def _sqlite_payment_add(row: str, sign: int) -> str:
    return f"""INSERT INTO payment_hourly (hour, kind, currency, collected, shard, payments, amount_cents,
                                           refunded_cents, disputed_lost_cents, credits_granted)
               VALUES (substr({row}.created_at, 1, 13), COALESCE({row}.kind, 'other'), {row}.currency,
                       {row}.status NOT IN ('unpaid', 'failed'), 0, {sign}, {sign} * {row}.amount_cents,
                       {sign} * {row}.amount_refunded, {sign} * {row}.amount_disputed_lost,
                       {sign} * {row}.credits_granted)
               ON CONFLICT (hour, kind, currency, collected, shard) DO UPDATE SET
                   payments = payments + excluded.payments, amount_cents = amount_cents + excluded.amount_cents,
                   refunded_cents = refunded_cents + excluded.refunded_cents,
                   disputed_lost_cents = disputed_lost_cents + excluded.disputed_lost_cents,
                   credits_granted = credits_granted + excluded.credits_granted;"""


def _sqlite_mrr_add(hour: str, row: str, change: str, new: str) -> str:
    return f"""INSERT INTO mrr_hourly (hour, currency, state, change_cents, new_cents)
               VALUES (substr({hour}, 1, 13), {row}.currency, {row}.state, {change}, {new})
               ON CONFLICT (hour, currency, state) DO UPDATE SET change_cents = change_cents + excluded.change_cents,
                                                                  new_cents = new_cents + excluded.new_cents;"""


def _sqlite_day_before(value: str) -> str:
    return f"(strftime('%Y-%m-%d %H:%M:%S', {value}, '-1 day') || '.000000')"


def _sqlite_period_from_ledger(table: str, name: str) -> str:
    """A paid subscription grant opens a span from its invoice's creation to the period's end (or the next
    span's start); earlier spans of the subscription that reach it (or end less than a day before) hand over.
    A base grant pays the invoice's amount a month; an upgrade's proration invoice, scaled to a whole month,
    is added to the amount of the span it follows."""
    created = "(SELECT created_at FROM payment WHERE id = NEW.payment_id)"
    this_end = ("(SELECT ends_at FROM subscription_period WHERE payment_id = NEW.payment_id "
                "AND subscription_id = NEW.subscription_id)")
    return f"""
CREATE TRIGGER {name} AFTER INSERT ON {table}
WHEN NEW.kind IN {PERIOD_KINDS} AND NEW.payment_id IS NOT NULL AND NEW.subscription_id IS NOT NULL
     AND NEW.period_end IS NOT NULL
     AND NOT EXISTS (SELECT 1 FROM subscription_period d
                     WHERE d.payment_id = NEW.payment_id AND d.subscription_id = NEW.subscription_id)
BEGIN
  INSERT INTO subscription_period (subscription_id, user_id, payment_id, state, source, starts_at, ends_at,
                                   amount_cents, currency, is_new, has_successor)
  SELECT NEW.subscription_id, NEW.user_id, p.id, 'active', NEW.kind, p.created_at,
         CASE WHEN nx.starts_at IS NOT NULL AND nx.starts_at < x.period_ends THEN nx.starts_at ELSE x.period_ends END,
         CASE WHEN NEW.kind = 'subscription_grant' OR pv.amount_cents IS NULL THEN p.amount_cents
              ELSE pv.amount_cents + CAST(ROUND(p.amount_cents
                   * (julianday(x.period_ends) - julianday(x.period_ends, '-1 month'))
                   / MAX(julianday(x.period_ends) - julianday(p.created_at), 1.0 / 24)) AS INTEGER) END,
         p.currency,
         NOT EXISTS (SELECT 1 FROM subscription_period o
                     WHERE o.subscription_id = NEW.subscription_id AND o.state = 'active'
                       AND o.starts_at <= p.created_at AND o.ends_at >= {_sqlite_day_before('p.created_at')}),
         nx.starts_at IS NOT NULL
  FROM payment p
  JOIN (SELECT strftime('%Y-%m-%d %H:%M:%S', NEW.period_end, 'unixepoch') || '.000000' AS period_ends) x
  LEFT JOIN subscription_period nx ON nx.id = (
      SELECT n.id FROM subscription_period n
      WHERE n.subscription_id = NEW.subscription_id AND n.state = 'active' AND n.starts_at > p.created_at
      ORDER BY n.starts_at LIMIT 1)
  LEFT JOIN subscription_period pv ON pv.id = (
      SELECT v.id FROM subscription_period v
      WHERE v.subscription_id = NEW.subscription_id AND v.state = 'active' AND v.starts_at <= p.created_at
      ORDER BY v.starts_at DESC, v.id DESC LIMIT 1)
  WHERE p.id = NEW.payment_id;

  UPDATE subscription_period SET ends_at = {created}, has_successor = 1
  WHERE subscription_id = NEW.subscription_id AND payment_id IS NOT NEW.payment_id
    AND starts_at <= {created} AND ends_at >= {_sqlite_day_before(created)};

  UPDATE subscription_period SET ends_at = starts_at, has_successor = 1
  WHERE subscription_id = NEW.subscription_id AND state = 'past_due' AND ends_at > starts_at
    AND starts_at > {created} AND starts_at < {this_end};
END"""


def _sqlite_period_status(table: str, name: str, old_status: str, *, event: str) -> str:
    """Cancelation ends the open spans; going past due hands the active span over to a past-due span at
    the amount last billed; coming back from past due ends the past-due span."""
    when = "NEW.updated_at"
    return f"""
CREATE TRIGGER {name} AFTER {event} ON {table}
WHEN NEW.status IS NOT {old_status}
BEGIN
  UPDATE subscription_period SET ends_at = CASE WHEN starts_at > {when} THEN starts_at ELSE {when} END
  WHERE NEW.status IN {ENDED} AND subscription_id = NEW.id AND ends_at > {when};

  INSERT INTO subscription_period (subscription_id, user_id, payment_id, state, source, starts_at, ends_at,
                                   amount_cents, currency, is_new, has_successor)
  SELECT NEW.id, NEW.user_id, NULL, 'past_due', NEW.status, {when}, '{FAR_FUTURE}', v.amount_cents, v.currency, 0, 0
  FROM subscription_period v
  WHERE NEW.status IN {PAST_DUE} AND COALESCE({old_status}, '') NOT IN {PAST_DUE}
    AND v.id = (SELECT id FROM subscription_period WHERE subscription_id = NEW.id AND state = 'active'
                AND starts_at <= {when} ORDER BY starts_at DESC, id DESC LIMIT 1);

  UPDATE subscription_period SET ends_at = {when}, has_successor = 1
  WHERE NEW.status IN {PAST_DUE} AND COALESCE({old_status}, '') NOT IN {PAST_DUE}
    AND subscription_id = NEW.id AND state = 'active'
    AND starts_at <= {when} AND ends_at >= {_sqlite_day_before(when)};

  UPDATE subscription_period SET ends_at = CASE WHEN starts_at > {when} THEN starts_at ELSE {when} END,
                                 has_successor = 1
  WHERE NEW.status IN ('active', 'trialing') AND subscription_id = NEW.id AND state = 'past_due'
    AND ends_at > {when};
END"""


def _sqlite_triggers() -> None:
    _run(f"CREATE TRIGGER ledger_hourly_rollup AFTER INSERT ON ledger_entry BEGIN {_sqlite_upsert_ledger()} END")
    payment_columns = ("created_at, kind, currency, status, amount_cents, amount_refunded, amount_disputed_lost, "
                       "credits_granted")
    _run(f"CREATE TRIGGER payment_hourly_insert AFTER INSERT ON payment BEGIN {_sqlite_payment_add('NEW', 1)} END")
    _run(f"CREATE TRIGGER payment_hourly_update AFTER UPDATE OF {payment_columns} ON payment "
         f"BEGIN {_sqlite_payment_add('OLD', -1)} {_sqlite_payment_add('NEW', 1)} END")
    _run(f"CREATE TRIGGER payment_hourly_delete AFTER DELETE ON payment BEGIN {_sqlite_payment_add('OLD', -1)} END")
    _run(f"""CREATE TRIGGER mrr_hourly_span_insert AFTER INSERT ON subscription_period BEGIN
               {_sqlite_mrr_add('NEW.starts_at', 'NEW', 'NEW.amount_cents',
                                'CASE WHEN NEW.is_new THEN NEW.amount_cents ELSE 0 END')}
               {_sqlite_mrr_add('NEW.ends_at', 'NEW', '-NEW.amount_cents', '0')}
             END""")
    _run(f"""CREATE TRIGGER mrr_hourly_span_update AFTER UPDATE OF ends_at ON subscription_period
             WHEN NEW.ends_at IS NOT OLD.ends_at BEGIN
               {_sqlite_mrr_add('OLD.ends_at', 'OLD', 'OLD.amount_cents', '0')}
               {_sqlite_mrr_add('NEW.ends_at', 'NEW', '-NEW.amount_cents', '0')}
             END""")
    _run(_sqlite_period_from_ledger("ledger_entry", "subscription_period_from_ledger"))
    _run(_sqlite_period_status("subscription", "subscription_period_status", "OLD.status", event="UPDATE OF status"))


# --- PostgreSQL -----------------------------------------------------------------------------------

def _pg_payment_add(row: str, sign: int) -> str:
    return f"""INSERT INTO payment_hourly (hour, kind, currency, collected, shard, payments, amount_cents,
                                           refunded_cents, disputed_lost_cents, credits_granted)
               VALUES ({PG_HOUR.format(row + '.created_at')}, COALESCE({row}.kind, 'other'), {row}.currency,
                       {row}.status NOT IN ('unpaid', 'failed'), {PG_SHARD.format(row + '.user_id')}, {sign},
                       {sign} * {row}.amount_cents, {sign} * {row}.amount_refunded,
                       {sign} * {row}.amount_disputed_lost, {sign} * {row}.credits_granted)
               ON CONFLICT (hour, kind, currency, collected, shard) DO UPDATE SET
                   payments = payment_hourly.payments + EXCLUDED.payments,
                   amount_cents = payment_hourly.amount_cents + EXCLUDED.amount_cents,
                   refunded_cents = payment_hourly.refunded_cents + EXCLUDED.refunded_cents,
                   disputed_lost_cents = payment_hourly.disputed_lost_cents + EXCLUDED.disputed_lost_cents,
                   credits_granted = payment_hourly.credits_granted + EXCLUDED.credits_granted;"""


def _pg_mrr_add(hour: str, row: str, change: str, new: str) -> str:
    return f"""INSERT INTO mrr_hourly (hour, currency, state, change_cents, new_cents)
               VALUES ({PG_HOUR.format(hour)}, {row}.currency, {row}.state, {change}, {new})
               ON CONFLICT (hour, currency, state) DO UPDATE SET
                   change_cents = mrr_hourly.change_cents + EXCLUDED.change_cents,
                   new_cents = mrr_hourly.new_cents + EXCLUDED.new_cents;"""


def _pg_function(name: str, body: str, declare: str = "") -> None:
    _run(f"CREATE FUNCTION {name}() RETURNS trigger AS $$ {declare} BEGIN {body} RETURN NULL; END; $$ "
         "LANGUAGE plpgsql")


def _postgres_triggers() -> None:
    _pg_function("rollup_ledger_hourly", f"""
        INSERT INTO ledger_hourly (hour, kind, shard, credits, entries)
        VALUES ({PG_HOUR.format('NEW.created_at')}, NEW.kind, {PG_SHARD.format('NEW.user_id')}, NEW.credits, 1)
        ON CONFLICT (hour, kind, shard) DO UPDATE SET credits = ledger_hourly.credits + EXCLUDED.credits,
                                                       entries = ledger_hourly.entries + EXCLUDED.entries;""")
    _run("CREATE TRIGGER ledger_hourly_rollup AFTER INSERT ON ledger_entry "
         "FOR EACH ROW EXECUTE FUNCTION rollup_ledger_hourly()")
    _pg_function("rollup_payment_hourly", f"""
        IF TG_OP IN ('UPDATE', 'DELETE') THEN {_pg_payment_add('OLD', -1)} END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN {_pg_payment_add('NEW', 1)} END IF;""")
    _run("CREATE TRIGGER payment_hourly_rollup AFTER INSERT OR DELETE OR UPDATE OF created_at, kind, currency, "
         "status, amount_cents, amount_refunded, amount_disputed_lost, credits_granted, user_id ON payment "
         "FOR EACH ROW EXECUTE FUNCTION rollup_payment_hourly()")
    _pg_function("rollup_mrr_hourly", f"""
        IF TG_OP = 'INSERT' THEN
            {_pg_mrr_add('NEW.starts_at', 'NEW', 'NEW.amount_cents',
                         'CASE WHEN NEW.is_new THEN NEW.amount_cents ELSE 0 END')}
            {_pg_mrr_add('NEW.ends_at', 'NEW', '-NEW.amount_cents', '0')}
        ELSIF NEW.ends_at IS DISTINCT FROM OLD.ends_at THEN
            {_pg_mrr_add('OLD.ends_at', 'OLD', 'OLD.amount_cents', '0')}
            {_pg_mrr_add('NEW.ends_at', 'NEW', '-NEW.amount_cents', '0')}
        END IF;""")
    _run("CREATE TRIGGER mrr_hourly_rollup AFTER INSERT OR UPDATE OF ends_at ON subscription_period "
         "FOR EACH ROW EXECUTE FUNCTION rollup_mrr_hourly()")
    _pg_function("rollup_subscription_period_from_ledger", declare="""DECLARE
        p_created timestamptz; p_amount bigint; p_currency text; period_ends timestamptz;
        span_end timestamptz; next_start timestamptz; prev_amount bigint; amount bigint;""", body=f"""
        IF NEW.kind NOT IN {PERIOD_KINDS} OR NEW.payment_id IS NULL OR NEW.subscription_id IS NULL
           OR NEW.period_end IS NULL OR EXISTS (
               SELECT 1 FROM subscription_period d
               WHERE d.payment_id = NEW.payment_id AND d.subscription_id = NEW.subscription_id) THEN
            RETURN NULL;
        END IF;
        SELECT created_at, amount_cents, currency INTO p_created, p_amount, p_currency
        FROM payment WHERE id = NEW.payment_id;
        IF NOT FOUND THEN RETURN NULL; END IF;
        period_ends := to_timestamp(NEW.period_end);
        SELECT min(starts_at) INTO next_start FROM subscription_period
        WHERE subscription_id = NEW.subscription_id AND state = 'active' AND starts_at > p_created;
        SELECT amount_cents INTO prev_amount FROM subscription_period
        WHERE subscription_id = NEW.subscription_id AND state = 'active' AND starts_at <= p_created
        ORDER BY starts_at DESC, id DESC LIMIT 1;
        IF NEW.kind = 'subscription_grant' OR prev_amount IS NULL THEN
            amount := p_amount;
        ELSE
            amount := prev_amount + round(p_amount
                * extract(epoch FROM period_ends - ((period_ends AT TIME ZONE 'UTC' - interval '1 month') AT TIME ZONE 'UTC'))
                / greatest(extract(epoch FROM period_ends - p_created), 3600));
        END IF;
        span_end := LEAST(period_ends, COALESCE(next_start, period_ends));
        INSERT INTO subscription_period (subscription_id, user_id, payment_id, state, source, starts_at, ends_at,
                                         amount_cents, currency, is_new, has_successor)
        VALUES (NEW.subscription_id, NEW.user_id, NEW.payment_id, 'active', NEW.kind, p_created, span_end,
                amount, p_currency,
                NOT EXISTS (SELECT 1 FROM subscription_period o
                            WHERE o.subscription_id = NEW.subscription_id AND o.state = 'active'
                              AND o.starts_at <= p_created AND o.ends_at >= p_created - interval '1 day'),
                next_start IS NOT NULL);
        UPDATE subscription_period SET ends_at = p_created, has_successor = true
        WHERE subscription_id = NEW.subscription_id AND payment_id IS DISTINCT FROM NEW.payment_id
          AND starts_at <= p_created AND ends_at >= p_created - interval '1 day';
        UPDATE subscription_period SET ends_at = starts_at, has_successor = true
        WHERE subscription_id = NEW.subscription_id AND state = 'past_due' AND ends_at > starts_at
          AND starts_at > p_created AND starts_at < span_end;""")
    _run("CREATE TRIGGER subscription_period_from_ledger AFTER INSERT ON ledger_entry "
         "FOR EACH ROW EXECUTE FUNCTION rollup_subscription_period_from_ledger()")
    _pg_function("rollup_subscription_period_status", declare="DECLARE old_status text; at timestamptz;", body=f"""
        IF TG_TABLE_NAME = 'rollup_replay_status' THEN
            old_status := NEW.old_status;
        ELSE
            old_status := OLD.status;
        END IF;
        IF NEW.status IS NOT DISTINCT FROM old_status THEN RETURN NULL; END IF;
        at := NEW.updated_at;
        IF NEW.status IN {ENDED} THEN
            UPDATE subscription_period SET ends_at = greatest(starts_at, at)
            WHERE subscription_id = NEW.id AND ends_at > at;
        ELSIF NEW.status IN {PAST_DUE} AND COALESCE(old_status, '') NOT IN {PAST_DUE} THEN
            INSERT INTO subscription_period (subscription_id, user_id, payment_id, state, source, starts_at,
                                             ends_at, amount_cents, currency, is_new, has_successor)
            SELECT NEW.id, NEW.user_id, NULL, 'past_due', NEW.status, at, '{FAR_FUTURE}+00', v.amount_cents,
                   v.currency, false, false
            FROM subscription_period v
            WHERE v.id = (SELECT id FROM subscription_period WHERE subscription_id = NEW.id AND state = 'active'
                          AND starts_at <= at ORDER BY starts_at DESC, id DESC LIMIT 1);
            UPDATE subscription_period SET ends_at = at, has_successor = true
            WHERE subscription_id = NEW.id AND state = 'active' AND starts_at <= at
              AND ends_at >= at - interval '1 day';
        ELSIF NEW.status IN ('active', 'trialing') THEN
            UPDATE subscription_period SET ends_at = greatest(starts_at, at), has_successor = true
            WHERE subscription_id = NEW.id AND state = 'past_due' AND ends_at > at;
        END IF;""")
    _run("CREATE TRIGGER subscription_period_status AFTER UPDATE OF status ON subscription "
         "FOR EACH ROW EXECUTE FUNCTION rollup_subscription_period_status()")


def downgrade() -> None:
    if _sqlite():
        for name in ("ledger_hourly_rollup", "payment_hourly_insert", "payment_hourly_update", "payment_hourly_delete",
                     "mrr_hourly_span_insert", "mrr_hourly_span_update", "subscription_period_from_ledger",
                     "subscription_period_status"):
            _run(f"DROP TRIGGER IF EXISTS {name}")
    else:
        for trigger, table in (("ledger_hourly_rollup", "ledger_entry"), ("payment_hourly_rollup", "payment"),
                               ("mrr_hourly_rollup", "subscription_period"),
                               ("subscription_period_from_ledger", "ledger_entry"),
                               ("subscription_period_status", "subscription")):
            _run(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        for function in ("rollup_ledger_hourly", "rollup_payment_hourly", "rollup_mrr_hourly",
                         "rollup_subscription_period_from_ledger", "rollup_subscription_period_status"):
            _run(f"DROP FUNCTION IF EXISTS {function}()")
    for table in ("mrr_hourly", "subscription_period", "payment_hourly", "ledger_hourly"):
        op.drop_table(table)
    op.drop_index("ix_credit_lot_open_expiry", table_name="credit_lot")
    op.drop_index("ix_credit_lot_expiry", table_name="credit_lot")
    op.drop_index("ix_subscription_status_tier", table_name="subscription")
    op.drop_index("ix_account_balance", table_name="account")
