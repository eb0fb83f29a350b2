"""Named, timed steps of the main job."""

from __future__ import annotations

import io
import time

import pytest

from defectscope.util.progress import StepTimer


def test_steps_are_timed_named_and_kept_when_they_fail():
    stream = io.StringIO()  # not a terminal: one line when a step starts and ends
    steps = StepTimer(stream=stream)
    with steps("grouping"):
        time.sleep(0.05)
    with pytest.raises(RuntimeError), steps("export"):
        raise RuntimeError("boom")
    assert list(steps.seconds) == ["grouping", "export"]
    assert steps.seconds["grouping"] >= 0.05
    text = stream.getvalue()
    assert "[grouping] ..." in text and "[grouping] done in" in text and "[export] done" in text
    table = steps.table().splitlines()
    assert table[0] == "| step | seconds |" and table[-1].startswith("| total | ")


def test_spinner_names_the_step_and_stops():
    stream = io.StringIO()
    steps = StepTimer(spinner=True, stream=stream)
    with steps("clustering"):
        time.sleep(0.6)
    assert "clustering (0 s)" in stream.getvalue()
    with steps("training", spin=False):  # has its own progress bar
        pass
    assert "training (" not in stream.getvalue()
