"""Demo and benchmark data generators, kept out of the domain core (billing_core).

`small`: the demo mode's sample customers (`python -m billing_core demo-data`), written through the ledger.
`large`: `demo-data --scale large`, bulk rows for measuring the dashboard at scale.
"""
from .small import DEMO_OPERATOR, DEMO_PREFIX, NotADemoDatabase, ensure_demo_operator, fill_demo_database

__all__ = ["DEMO_OPERATOR", "DEMO_PREFIX", "NotADemoDatabase", "ensure_demo_operator", "fill_demo_database"]
