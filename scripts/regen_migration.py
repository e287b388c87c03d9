"""Developer tool: regenerate migration 0001 from the models (only while no release has shipped).

    .venv/bin/python scripts/regen_migration.py
"""
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from alembic import command  # noqa: E402

from billing_core.db import alembic_config, get_engine, MIGRATIONS_DIR  # noqa: E402

versions = MIGRATIONS_DIR / "versions"
target = versions / "0001_initial_schema.py"
target.unlink(missing_ok=True)
later = [p for p in versions.glob("0*.py") if p != target]
aside = pathlib.Path(tempfile.mkdtemp())
for path in later:  # autogenerate 0001 alone, against an empty database
    path.rename(aside / path.name)
try:
    url = f"sqlite:///{tempfile.mkdtemp()}/gen.db"
    cfg = alembic_config(url)
    with get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message="initial schema", autogenerate=True, rev_id="0001")
finally:
    for path in later:
        (aside / path.name).rename(path)
text = re.sub(r"Create Date: .*", "Create Date: 2026-11-27", target.read_text())
target.write_text(text)
print(f"wrote {target}")
