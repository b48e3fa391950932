"""Progress bars on stderr (tqdm), shown only on a terminal and never with ``--quiet``."""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on (the default: on a terminal only) or off (``--quiet``)."""
    global _enabled
    _enabled = enabled


def bar(total: int | None, description: str, unit: str) -> tqdm:
    """Return a progress bar; ``disable=None`` lets tqdm hide it when stderr is not a terminal."""
    return tqdm(total=total, desc=description, unit=unit, leave=False, disable=None if _enabled else True)


def counter(progress_bar: tqdm) -> Callable[[int], None]:
    """Return a callback that moves ``progress_bar`` to the count of items done it receives."""

    def update(done: int) -> None:
        progress_bar.update(done - progress_bar.n)

    return update
