"""Running one function on several threads at once, for the tests that race writers against each other."""
from __future__ import annotations

import threading


def run_threads(count: int, target, *, timeout: float = 120) -> list[Exception]:
    """`target(n)` on `count` threads (n = 0 … count-1), all joined; the exceptions they raised, for the test to check."""
    errors: list[Exception] = []

    def wrapped(n: int) -> None:
        try:
            target(n)
        except Exception as exc:  # collected and checked by the test
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return errors
