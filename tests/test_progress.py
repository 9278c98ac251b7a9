"""Progress bars: plain lines where stderr is no terminal, tqdm's bar where it is; quiet libraries."""

from __future__ import annotations

import io
import sys
import warnings

import pytest
from tqdm.std import tqdm

from cairn import progress
from cairn.progress import bar, quiet_libraries, write

QUIET_VARIABLES = ["TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def redirected(monkeypatch) -> io.StringIO:
    """Redirect stderr to a StringIO (no tty) for the rest of the test, with the default interval.
    (Called in the test's body: pytest's capture replaces sys.stderr again after fixtures run.)"""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("CAIRN_PROGRESS_INTERVAL", raising=False)
    return out


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_bar_over_a_redirected_stderr_prints_plain_start_and_finish_lines(monkeypatch):
    stderr = redirected(monkeypatch)
    assert list(bar(range(7), desc="lora on pack:people", leave=True)) == list(range(7))
    text = stderr.getvalue()
    assert "\r" not in text and "\x1b" not in text
    first, *_, last = lines(stderr)
    assert first.startswith("lora on pack:people: 0/7") and "started" in first
    assert last.startswith("lora on pack:people: 7/7 (100%) done in")


def test_an_interval_of_zero_prints_a_line_per_update_and_the_last_as_the_finish(monkeypatch):
    stderr = redirected(monkeypatch)
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "0")
    with bar(total=4, desc="steps", leave=True) as b:
        for _ in range(4):
            b.update(1)
    # the last update's line is the finish line
    assert [line.split(",")[0] for line in lines(stderr)] == ["steps: 0/4 (0%) started", "steps: 1/4 (25%)", "steps: 2/4 (50%)", "steps: 3/4 (75%)", "steps: 4/4 (100%) done in 0:00:00"]


def test_a_long_interval_prints_only_the_start_and_the_finish(monkeypatch):
    stderr = redirected(monkeypatch)
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "3600")
    for _ in bar(range(50), desc="seq-lora seed 0", leave=True):
        pass
    assert len(lines(stderr)) == 2


def test_a_transient_bar_shows_its_end_only_where_it_showed_progress(monkeypatch):
    stderr = redirected(monkeypatch)
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "3600")
    assert list(bar(range(50), desc="generating")) == list(range(50))
    assert stderr.getvalue() == ""  # finished within the interval: no line, as tqdm's vanishes
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "0")
    for _ in bar(range(2), desc="generating"):
        pass
    assert [line.split(",")[0] for line in lines(stderr)] == ["generating: 1/2 (50%)", "generating: 2/2 (100%) done in 0:00:00"]


def test_the_default_interval_is_thirty_seconds_and_a_bad_value_falls_back_with_a_note(monkeypatch):
    stderr = redirected(monkeypatch)
    assert bar(total=1).interval == 30
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "soon")
    monkeypatch.setattr(progress, "_noted", set())
    assert bar(total=1).interval == 30
    assert "CAIRN_PROGRESS_INTERVAL='soon' is not a number of seconds" in stderr.getvalue()


def test_a_disabled_bar_prints_nothing(monkeypatch):
    stderr = redirected(monkeypatch)
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "0")
    b = bar(range(3), desc="quiet", disable=True)
    assert list(b) == [0, 1, 2]
    assert stderr.getvalue() == ""


def test_the_postfix_and_the_rate_appear_in_the_lines(monkeypatch):
    stderr = redirected(monkeypatch)
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "0")
    b = bar(total=10, initial=2, desc="lora on people", leave=True)
    b.set_postfix(epoch=1, loss="1.234")
    b.update(3)
    assert b.n == 5 and b.total == 10
    assert lines(stderr)[1].startswith("lora on people: 5/10 (50%), ")
    assert " it/s, " in lines(stderr)[1] and " elapsed, eta " in lines(stderr)[1]
    assert lines(stderr)[1].endswith("epoch=1, loss=1.234")
    b.set_postfix_str("merging")
    b.close()
    b.close()  # once only
    assert lines(stderr)[-1].startswith("lora on people: 5/10 (50%) stopped after") and lines(stderr)[-1].endswith(", merging")
    assert len(lines(stderr)) == 3


def test_the_lines_go_to_the_stderr_of_the_moment_they_are_written(monkeypatch):
    monkeypatch.setenv("CAIRN_PROGRESS_INTERVAL", "0")
    before, after = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", before)
    b = bar(total=2, desc="x", leave=True)
    monkeypatch.setattr(sys, "stderr", after)
    b.update(1)
    assert before.getvalue().startswith("x: 0/2") and after.getvalue().startswith("x: 1/2")


def test_on_a_terminal_the_bar_is_tqdms(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Tty())
    b = bar(range(3), desc="generating", leave=False)
    assert isinstance(b, tqdm) and b.desc == "generating" and not b.leave
    b.close()


def test_write_prints_a_plain_line_to_stdout(monkeypatch, capsys):
    stderr = redirected(monkeypatch)
    write("stage 1 of 3")
    assert capsys.readouterr().out == "stage 1 of 3\n"
    assert stderr.getvalue() == ""


@pytest.fixture
def environment(monkeypatch):
    """The variables quiet_libraries sets, unset for the test and restored after; no -W options."""
    for name in QUIET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "warnoptions", [])
    return monkeypatch


def test_quiet_libraries_sets_the_defaults_but_keeps_the_users_own_values(environment):
    import os

    environment.setattr(sys, "stderr", io.StringIO())  # no terminal: the library bars go too
    environment.setenv("TRANSFORMERS_VERBOSITY", "info")
    with warnings.catch_warnings():
        quiet_libraries()
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


def test_quiet_libraries_leaves_the_library_progress_bars_on_a_terminal(environment):
    import os

    environment.setattr(sys, "stderr", Tty())
    with warnings.catch_warnings():
        quiet_libraries()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ


def warned(category, module: str, message: str = "`x` is deprecated") -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit(message, category, "lib.py", 1, module=module, registry={})
    return bool(seen)


def test_a_library_future_warning_is_silenced_but_not_the_users_own(environment):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert warned(FutureWarning, "transformers.modeling_utils")
        quiet_libraries()
        assert not warned(FutureWarning, "transformers.modeling_utils")
        assert not warned(FutureWarning, "peft")
        assert not warned(UserWarning, "torch.nn.modules", "`foo` is deprecated, use bar")
        assert warned(UserWarning, "torch.nn.modules", "None of the inputs have requires_grad=True")
        assert warned(FutureWarning, "transformers_fork.x")
        assert warned(FutureWarning, "my_script")


def test_a_users_warning_options_are_kept(environment):
    environment.setattr(sys, "warnoptions", ["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        quiet_libraries()
        assert warned(FutureWarning, "transformers.modeling_utils")
