"""Progress bars that suit where they are shown, log lines that do not break them, and quiet libraries.

On a terminal `bar` is tqdm's bar. Elsewhere (stderr redirected to a file or a pipe) it prints
plain lines instead: one at most every `CAIRN_PROGRESS_INTERVAL` seconds (default 30), and for a
bar that stays on a terminal (`leave=True`: a run's stages) one when it starts and one when it
finishes; a transient bar (an evaluation's batches, a training's steps) shows its end only where
it showed progress, as tqdm's vanishes (a small run's log held 2 lines per evaluation otherwise), e.g.

    lora on people: 40/200 (20%), 3.1 it/s, 0:00:13 elapsed, eta 0:00:52, loss=1.234

Why not tqdm there too: tqdm has no plain-line mode. Its printer always writes `'\\r' + line` (tqdm
4.70 `std.py`, `status_printer.print_status`) and a nested bar moves the cursor with `moveto`,
which writes `_term_move_up()` (ESC[A); `mininterval` only spaces the frames out, `ascii` only
changes the bar's characters, and `disable=None` ("disable on non-TTY") prints nothing at all. A
log file then holds hundreds of `\\r` frames and cursor-up codes and no readable line.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from datetime import timedelta
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

INTERVAL_S = 30.0  # between two plain lines, unless CAIRN_PROGRESS_INTERVAL says otherwise
_noted: set[str] = set()  # invalid CAIRN_PROGRESS_INTERVAL values already reported


def _interactive() -> bool:
    """Whether tqdm's bars can be shown: stderr is a terminal, or tqdm.auto found a notebook (whose
    stderr is no tty but shows tqdm's widget)."""
    return sys.stderr.isatty() or any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


def _interval() -> float:
    """Seconds between two plain lines: `CAIRN_PROGRESS_INTERVAL` when it is a number >= 0 (0: a line
    per update), else the default, with a note on stderr (once per value) saying so."""
    raw = os.environ.get("CAIRN_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value >= 0 and value != float("inf"):
        return value
    if raw not in _noted:
        _noted.add(raw)
        print(f"cairn: CAIRN_PROGRESS_INTERVAL={raw!r} is not a number of seconds >= 0; using {INTERVAL_S:g}", file=sys.stderr, flush=True)
    return INTERVAL_S


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


class PlainBar:
    """The part of tqdm's surface Cairn uses (iteration, `update`, `set_postfix`, `set_postfix_str`,
    `close`, `with`, `n`, `total`), printing plain lines to `sys.stderr` as it is at each write."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, initial: float = 0,
                 desc: str = "", disable: bool | None = False, leave: bool = False, unit: str = "it"):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n, self.initial = iterable, total, initial, initial
        self.desc, self.unit, self.disable, self.postfix = desc or "progress", unit, disable is not False, ""
        self.interval, self.closed, self.leave, self.shown = _interval(), False, leave, False
        self.start = self.last = time.monotonic()
        if leave:
            self._print(f"{self._count()} started")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total if self.total is not None else len(self.iterable))

    def __enter__(self) -> PlainBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and not (self.total and self.n >= self.total):  # the last: close's line
            self.last = now
            self._print(self._line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not (self.leave or self.shown):  # a transient bar that never showed progress leaves no line
            return
        now = time.monotonic()
        ended = "done in" if self.total is None or self.n >= self.total else "stopped after"
        self._print(f"{self._count()} {ended} {_clock(now - self.start)}, {self._rate(now)}" + (f", {self.postfix}" if self.postfix else ""))

    def _count(self) -> str:
        if not self.total:
            return _number(self.n)
        return f"{_number(self.n)}/{_number(self.total)} ({100 * self.n / self.total:.0f}%)"

    def _per_s(self, now: float) -> float:
        return (self.n - self.initial) / max(now - self.start, 1e-9)  # since this bar began (a resumed run's too)

    def _rate(self, now: float) -> str:
        per_s = self._per_s(now)
        if per_s and per_s < 1:
            return f"{1 / per_s:.3g} s/{self.unit}"
        return f"{per_s:.0f} {self.unit}/s" if per_s >= 100 else f"{per_s:.3g} {self.unit}/s"

    def _line(self, now: float) -> str:
        parts = [self._count(), self._rate(now), f"{_clock(now - self.start)} elapsed"]
        per_s = self._per_s(now)
        if self.total and per_s > 0 and self.n < self.total:
            parts.append(f"eta {_clock((self.total - self.n) / per_s)}")
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def _print(self, text: str) -> None:
        if not self.disable:
            print(f"{self.desc}: {text}", file=sys.stderr, flush=True)
            self.shown = True


def bar(iterable: Iterable | None = None, *, total: float | None = None, initial: float = 0, desc: str = "",
        disable: bool | None = False, leave: bool = False, unit: str = "it", **tqdm_options: Any) -> tqdm | PlainBar:
    """A progress bar: tqdm's on a terminal (or in a notebook), given every argument; elsewhere a
    `PlainBar` printing plain lines (`tqdm_options` concern only tqdm's display)."""
    if _interactive():
        return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, leave=leave, unit=unit, **tqdm_options)
    return PlainBar(iterable, total=total, initial=initial, desc=desc, disable=disable, leave=leave, unit=unit)


def write(message: str) -> None:
    """Print a log line to stdout, as `tqdm.write` does, without breaking a bar drawn on the terminal."""
    if _interactive():
        tqdm.write(message)
    else:
        print(message, flush=True)


# The libraries whose warnings are theirs to fix, not the user's (matched against the start of the
# module a warning is attributed to).
_LIBRARIES = r"(transformers|peft|accelerate|torch|huggingface_hub|datasets)(\.|$)"


def quiet_libraries() -> None:
    """Silence the libraries' noise when Cairn runs as a command; call it before importing them (the
    environment variables are read at import). A variable the user set, or a `-W` / PYTHONWARNINGS
    option, is kept.

    Seen with transformers 5.24 and peft 0.21 (`cairn train`, `eval`, `generate`, `run`): on every
    adapter, `FutureWarning: is_gradient_checkpointing is deprecated ... Use
    is_activation_checkpointing` from transformers/modeling_utils.py, which peft's `PeftModel`
    (peft_model.py, mixed_model.py) triggers by reading that property; and transformers' "Loading
    weights" tqdm bar (core_model_loading.py), which honours HF_HUB_DISABLE_PROGRESS_BARS. The
    verbosity variables keep transformers' logger warnings (generation flags, advisory notes) out of
    a command's output; the progress-bar variables apply only where stderr is no terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not _interactive():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", category=FutureWarning, module=_LIBRARIES)
        warnings.filterwarnings("ignore", message=r".*deprecat", category=UserWarning, module=_LIBRARIES)
