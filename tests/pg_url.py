"""Print the PostgreSQL URL for the tests when that server answers; say so on stderr when not."""
import sys

URL = "postgresql://postgres@127.0.0.1:5432/test"

try:
    import psycopg

    psycopg.connect(URL, connect_timeout=3).close()
except Exception as exc:  # any failure means: run on SQLite only
    print(f"PostgreSQL at 127.0.0.1:5432 did not answer ({type(exc).__name__}); "
          "running the database tests on SQLite only", file=sys.stderr)
    sys.exit(0)
print(URL)
