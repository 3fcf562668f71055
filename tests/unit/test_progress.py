"""StepProgress: one updating line on a terminal, plain lines elsewhere, stage timings at the end of a step."""

import io

from cipo_nemo.utils.progress import StepProgress
from cipo_nemo.utils.timing import StageTimer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _one_step(progress: StepProgress) -> None:
    timer = StageTimer(on_stage=progress.stage)
    progress.begin_step(3, 10)
    with timer.time("rollout"):
        progress.expect(16, "samples")
        progress.advance(16)
    with timer.time("train"):
        progress.expect(2, "optimizer steps")
        progress.advance()
        progress.advance()
    progress.end_step(timer.pop())


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    _one_step(StepProgress(out))
    lines = out.getvalue().splitlines()
    assert lines[:5] == ["step 3/10 | rollout", "step 3/10 | rollout: 16/16 samples", "step 3/10 | train",
                         "step 3/10 | train: 1/2 optimizer steps", "step 3/10 | train: 2/2 optimizer steps"]
    assert lines[5].startswith("  step 3/10 stages: rollout 0.0s, train 0.0s")
    assert len(lines) == 6


def test_one_updating_line_on_a_terminal():
    out = Terminal()
    _one_step(StepProgress(out))
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "step 3/10 rollout: 16/16 samples" in text and "step 3/10 train: 2/2 optimizer steps" in text
    assert "step 3/10 | rollout" not in text  # no plain lines
    assert text.rstrip("\n").splitlines()[-1].startswith("  step 3/10 stages: rollout")
