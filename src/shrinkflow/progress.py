"""Progress for long loops: a bar on a terminal, a few plain lines in logs and CI."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty()


def say(message: str) -> None:
    """One plain status line on stderr (stdout stays free for machine-readable output)."""
    print(message, file=sys.stderr, flush=True)


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal; otherwise print at most ~10 lines of progress."""
    if interactive():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=description, leave=False, file=sys.stderr)
        return
    step = max(1, (total or 0) // 10)
    start = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if total and (i % step == 0 or i == total):
            say(f"{description}: {i}/{total} ({time.perf_counter() - start:.1f} s)")
