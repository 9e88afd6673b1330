"""Progress of long work, written to stderr.

* :func:`bar`: an experiment's inner loop (tqdm on a terminal, silent otherwise).
* :class:`Progress`: a run of experiments. On a terminal, one bar naming the running
  experiment(s), advanced by time against each experiment's expected cost, so that an
  experiment without inner bars (``data_parallel``) moves it too; tqdm's estimate of the time
  left is then the remaining expected cost at the rate measured so far. Without a terminal (CI
  logs, ``| tee``, nohup), one line per experiment started and finished, with its time.

Set ``SGDLAB_PROGRESS=0`` to silence both, ``SGDLAB_PROGRESS=1`` to force the bars on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TextIO, TypeVar

__all__ = ["Progress", "bar"]

T = TypeVar("T")

# A running experiment advances the bar by its elapsed time up to this share of its expected
# cost; the rest comes when it finishes (an experiment slower than expected does not overrun).
_RUNNING_SHARE = 0.95


def _disabled() -> bool | None:
    flag = os.environ.get("SGDLAB_PROGRESS")
    if flag == "0":
        return True
    if flag == "1":
        return False
    return None  # tqdm: disable when stderr is not a terminal


def bar(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm progress bar written to stderr."""
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, disable=_disabled(), leave=False))


def _mode(stream: TextIO) -> str:
    """``"off"``, ``"bar"`` (a terminal, or ``SGDLAB_PROGRESS=1``) or ``"lines"``."""
    flag = _disabled()
    if flag is True:
        return "off"
    if flag is False:
        return "bar"
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Progress:
    """Progress of the experiments ``names``, with ``costs[name]`` the expected wall time in
    seconds of each (only their ratios matter to the estimate of the time left).

    Call :meth:`started` and :meth:`finished` as each experiment starts and ends (several may
    run at once), then :meth:`close`.
    """

    def __init__(
        self, names: Sequence[str], costs: Mapping[str, float], stream: TextIO | None = None
    ) -> None:
        self.names = list(names)
        self.costs = {n: float(costs.get(n, 1.0)) for n in self.names}
        self.stream = stream if stream is not None else sys.stderr
        self.mode = _mode(self.stream)
        self._running: dict[str, float] = {}  # name -> start (monotonic)
        self._done_cost = 0.0
        self._count = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=round(sum(self.costs.values()), 1),
                desc="experiments",
                file=self.stream,
                unit="s",
                bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
            )
            self._ticker = threading.Thread(target=self._tick, name="sgdlab-progress", daemon=True)
            self._ticker.start()

    def _index(self, name: str) -> str:
        return f"[{self.names.index(name) + 1}/{len(self.names)}]"

    def _line(self, text: str) -> None:
        print(f"sgdlab: {text}", file=self.stream, flush=True)

    def started(self, name: str) -> None:
        with self._lock:
            self._running[name] = time.monotonic()
        if self.mode == "lines":
            self._line(
                f"{self._index(name)} {name} started (expected about {_duration(self.costs[name])})"
            )
        self._refresh()

    def finished(self, name: str, summary: Mapping[str, Any]) -> None:
        """``summary``: :func:`~sgdlab.lab.runner.run_experiment`'s (status, wall_time_s,
        reason for a skip)."""
        with self._lock:
            start = self._running.pop(name, time.monotonic())
            self._done_cost += self.costs[name]
            self._count += 1
        took = time.monotonic() - start
        if summary.get("status") == "skipped":
            text = f"{name} skipped: {summary.get('reason', 'already finished')}"
        else:
            text = f"{name} {summary.get('status', 'finished')} in {_duration(took)}"
        if self.mode == "lines":
            self._line(f"{self._index(name)} {text}")
        elif self.mode == "bar":
            self._bar.write(f"{self._index(name)} {text}", file=self.stream)
        self._refresh()

    def _refresh(self) -> None:
        if self._bar is None:
            return
        now = time.monotonic()
        with self._lock:
            running = list(self._running.items())
            n = self._done_cost + sum(
                min(now - t, _RUNNING_SHARE * self.costs[k]) for k, t in running
            )
            label = ", ".join(k for k, _ in running) or "experiments"
            count = self._count
        self._bar.set_description_str(f"{label} [{count}/{len(self.names)} done]", refresh=False)
        self._bar.n = min(n, self._bar.total)
        self._bar.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"
