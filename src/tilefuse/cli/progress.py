"""The one progress bar of a command (CLI only; the library never prints).

:class:`ProgressBar` is a ``progress(done, total, label)`` callback, the library's progress
protocol (:data:`tilefuse.pipeline.ProgressFn`): registration reports pairs measured, then the
solve; a write reports chunks stored of the whole image, every batch and pyramid level in one
count. The bar restarts only when the count changes (pairs -> solve -> chunks), so a fusion
shows one bar that reaches 100% once, with its rate and time left.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

__all__ = ["ProgressBar"]

_UNITS = {"registering pairs": "pair", "solving": "step", "estimating flat field": "read"}
"""What a label counts; anything else counts chunks."""


class ProgressBar:
    """One tqdm bar on stderr for a whole command, fed ``bar(done, total, label)``.

    Parameters
    ----------
    enabled : bool
        False makes it a no-op (``--quiet``).
    file : text stream, optional
        Where the bar goes (default ``sys.stderr``).

    Notes
    -----
    ``total == 0`` (a stage with no count, e.g. ``"planning"``) shows nothing. `done` is
    absolute: a report may jump ahead or repeat, never moves the bar back.
    """

    def __init__(self, *, enabled: bool = True, file: TextIO | None = None) -> None:
        self.enabled = enabled
        self.file = file
        self.bar: tqdm | None = None
        self.unit = ""

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled or total <= 0:
            return
        unit = _UNITS.get(label, "chunk")
        if self.bar is None or total != self.bar.total or unit != self.unit:
            self.close()
            self.unit = unit
            self.bar = tqdm(total=total, desc=label, unit=unit, file=self.file or sys.stderr,
                            leave=True, dynamic_ncols=True, smoothing=0.05)
        bar = self.bar
        if bar.desc != label:
            bar.set_description_str(label, refresh=False)
        step = min(done, total) - bar.n
        if step > 0:
            bar.update(step)

    def say(self, line: str) -> None:
        """Print a line for a person on the bar's stream, above the bar while it runs."""
        if self.bar is not None:
            self.bar.write(line, file=self.file or sys.stderr)
        else:
            print(line, file=self.file or sys.stderr)

    def close(self, *, failed: bool = False) -> None:
        """End the bar; after a failure it is cleared, so the error is the last line shown."""
        if self.bar is not None:
            if failed:
                self.bar.leave = False
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)
