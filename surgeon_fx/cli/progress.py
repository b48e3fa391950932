"""Progress bars on stderr (tqdm), shown only on a terminal and never with ``--quiet``."""

from __future__ import annotations

import sys
from typing import Callable

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on (the default: on a terminal only) or off (``--quiet``).

    Transformers' own bars (such as "Loading weights") follow the same rule.
    """
    global _enabled
    _enabled = enabled
    from transformers.utils import logging as transformers_logging

    if enabled and sys.stderr.isatty():
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()


def bar(total: int | None, description: str, unit: str) -> tqdm:
    """Return a progress bar; ``disable=None`` lets tqdm hide it when stderr is not a terminal."""
    return tqdm(total=total, desc=description, unit=unit, leave=False, disable=None if _enabled else True)


def counter(progress_bar: tqdm) -> Callable[[int], None]:
    """Return a callback that moves ``progress_bar`` to the count of items done it receives."""

    def update(done: int) -> None:
        progress_bar.update(done - progress_bar.n)

    return update
