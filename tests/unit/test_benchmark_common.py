"""benchmarks/common: the one synthetic-batch builder and the one /proc sampler that the speed benchmarks, the
probes and the GPU check share."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import torch

from benchmarks.common.batches import PAD_ID, synthetic_batch, variable_length_batch
from benchmarks.common.proc_sampler import ProcSampler, _parse_stat, read_processes, read_threads


def test_rows_hold_their_prompt_then_response_then_padding() -> None:
    batch = synthetic_batch([2, 5, 1], [3, 1, 6], vocab_size=50, generator=torch.Generator().manual_seed(0),
                            group_size=2, width=9)
    assert batch["input_ids"].shape == (3, 9)
    assert batch["prompt_mask"].sum(dim=1).tolist() == [2, 5, 1]
    assert batch["response_mask"].sum(dim=1).tolist() == [3, 1, 6]
    assert batch["response_mask"][0].tolist() == [False, False, True, True, True, False, False, False, False]
    real = batch["prompt_mask"] | batch["response_mask"]
    assert not (batch["prompt_mask"] & batch["response_mask"]).any()
    assert (batch["input_ids"][~real] == PAD_ID).all()
    assert ((batch["input_ids"][real] >= 4) & (batch["input_ids"][real] < 50)).all()
    # log pi_old = -log V on response tokens, 0 elsewhere; the engine's logprobs start equal to it
    assert torch.allclose(batch["old_logprobs"][batch["response_mask"]], torch.tensor(-math.log(50)))
    assert (batch["old_logprobs"][~batch["response_mask"]] == 0).all()
    assert torch.equal(batch["generation_logprobs"], batch["old_logprobs"])
    assert batch["group_id"].tolist() == [0, 0, 1] and batch["sample_kind"] == ["base"] * 3


def test_the_width_defaults_to_the_longest_row_and_a_seed_repeats_the_batch() -> None:
    first = variable_length_batch(vocab_size=64, lengths=[8, 13, 4], seed=3)
    assert first["input_ids"].shape == (3, 13)
    assert first["prompt_mask"].sum(dim=1).tolist() == [2, 3, 1]  # a quarter, at least one token
    again = variable_length_batch(vocab_size=64, lengths=[8, 13, 4], seed=3)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["advantages"],
                                                                                again["advantages"])
    other = variable_length_batch(vocab_size=64, lengths=[8, 13, 4], seed=4)
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_stat_lines_parse_with_spaces_and_parentheses_in_the_name() -> None:
    name, fields = _parse_stat("42 (a (b) c) S 7 " + " ".join(["0"] * 9) + " 150 50 " + " ".join(["0"] * 10))
    assert name == "a (b) c" and fields[0] == "S" and fields[1] == "7"
    assert (fields[11], fields[12]) == ("150", "50")  # utime, stime


def test_the_sampler_reads_at_entry_while_running_and_at_exit() -> None:
    class Readings(ProcSampler):
        def __init__(self) -> None:
            super().__init__(interval_s=0.05)
            self.firsts: list[bool] = []
            self.saw_myself: list[bool] = []
            self.threads: list[str] = []

        def record(self, now, processes, *, first):
            self.firsts.append(first)
            self.saw_myself.append(any(pid == os.getpid() for pid, _ in processes))
            self.threads.append(threading.current_thread().name)

    with Readings() as readings:
        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3)"], check=True)
    assert readings.firsts[0] is True and not any(readings.firsts[1:])
    assert len(readings.firsts) >= 4  # entry, several in between, exit
    assert all(readings.saw_myself)
    main = threading.main_thread().name
    assert readings.threads[0] == main and readings.threads[-1] == main
    assert any(name != main for name in readings.threads[1:-1])


def test_readers_see_this_process_and_its_threads() -> None:
    me = [sample for (pid, _), sample in read_processes().items() if pid == os.getpid()]
    assert len(me) == 1 and me[0].ppid == os.getppid() and me[0].cpu_s > 0
    threads = read_threads(os.getpid())
    assert (os.getpid(), os.getpid()) in threads  # the main thread's tid is the pid
    assert read_threads(2**30) == {}  # no such process: nothing, no error
