"""Wall-clock durations as Slurm and NeMo-RL spell them (`checkpointing.checkpoint_must_save_by`)."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(?:(\d+):)?(\d+):(\d+):(\d+)$")


def parse_duration(text: str) -> int:
    """'DD:HH:MM:SS' or 'HH:MM:SS' (Slurm's and NeMo-RL's spelling) -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"expected 'DD:HH:MM:SS' or 'HH:MM:SS', got {text!r}")
    days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"minutes and seconds must be < 60 in {text!r}")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
