"""benchmarks/speed/step_speed.py's bookkeeping (the benchmark itself runs minutes and is not a test): CPU seconds are
attributed to the benchmark's own process tree, and the report's ratios and verdicts follow from the summaries."""

import subprocess
import sys

from benchmarks.speed.cpu_watch import CpuWatch
from benchmarks.speed.step_speed import report, targets

BURN = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"


def test_cpu_of_a_child_process_counts_as_the_benchmarks_own() -> None:
    with CpuWatch(interval_s=0.1) as watch:
        subprocess.run([sys.executable, "-c", BURN], check=True)
    assert watch.report.own_s >= 0.5
    assert watch.report.machine_busy_s >= watch.report.own_s - 0.1


def test_cpu_of_an_unrelated_process_counts_as_other() -> None:
    burner = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(0.3)\n" + BURN])
    try:
        with CpuWatch(interval_s=0.1, root_pid=1_000_000_000) as watch:  # a root no process descends from
            burner.wait()
    finally:
        burner.kill()
    assert watch.report.other_s >= 0.5 and watch.report.own_s == 0.0
    assert any(name.startswith("python") for name, _ in watch.report.top_others)


def summary(side: str, step_s: list[float], **per_step: list[float]) -> dict:
    steps = [{"seconds": s, **{key: values[i] for key, values in per_step.items()}} for i, s in enumerate(step_s)]
    return {"side": side, "steps": steps, "median_step_s": sorted(step_s[1:])[len(step_s[1:]) // 2],
            "cpu": {"wall_s": 100.0, "own_cpu_s": 190.0, "other_cpu_s": 1.0, "other_share": 0.01}, "refit_profile": {}}


def test_report_ratios_and_verdicts() -> None:
    trl = summary("trl", [30, 20, 20, 20], rollout_s=[5, 4, 4, 4], prompt_tokens=[400] * 4, completion_tokens=[500] * 4)
    grpo = summary("ours", [30, 10, 10, 10], **{"timing/refit": [1, 1, 1, 1], "timing/train": [5] * 4,
                                                  "tokens/base_sequence": [900] * 4, "tokens/correction_sequence": [0] * 4})
    cipo = summary("ours", [60, 30, 30, 30], **{"timing/refit": [1] * 4, "tokens/base_sequence": [900] * 4,
                                                  "tokens/correction_sequence": [1800] * 4})
    results = {"trl": trl, "grpo_megatron_vllm": grpo, "cipo_megatron_vllm": cipo}
    verdicts = targets(results)
    assert "GRPO step / TRL step: 0.50 (target <= 0.6: met)" in verdicts[0]
    assert "refit share of the Megatron + vLLM GRPO step: 10.0% (target <= 5%: NOT met)" in verdicts[1]
    # CIPO: 30 s / 2700 tokens against GRPO: 10 s / 900 tokens -> 1.00
    assert "per processed token: 1.00 (target <= 1.15: met)" in verdicts[3]
    lines = report(results, type("Args", (), {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 64,
                                               "threads": 2, "seed": 0, "steps": 4, "scale": 1,
                                               "trl_micro_batch": None})())
    assert any(line.startswith("grpo_megatron_vllm") and " 0.50 " in line for line in lines)


def test_the_skip_is_reported_side_by_side() -> None:
    trained = {"train/tokens_trained/base": [300] * 4, "train/tokens_trained/correction": [100] * 4}
    on = summary("ours", [30, 6, 6, 6], **{"timing/train": [3] * 4, "timing/logprobs": [0] * 4, **trained})
    off = summary("ours", [30, 10, 10, 10], **{"timing/train": [7] * 4, "timing/logprobs": [0] * 4,
                                                 "train/tokens_trained/base": [900] * 4,
                                                 "train/tokens_trained/correction": [700] * 4})
    lines = targets({"cipo_megatron_vllm": on, "cipo_megatron_vllm_noskip": off})
    assert ("CIPO with the zero-advantage skip / without: step 0.60 (6.00 / 10.00 s), train 3.00 / 7.00 s, logprobs "
            "0.00 / 0.00 s, response tokens trained 400 / 1600 per step") in lines


def test_the_study_configuration_report_compares_curves_and_weights() -> None:
    import torch

    from benchmarks.speed.zero_advantage_skip import arm_report

    on = summary("ours", [30, 6, 6], **{"timing/train": [3] * 3, "reward/base_mean": [0.5, 0.25, 0.5],
                                          "train/tokens_trained/base": [300] * 3})
    off = summary("ours", [30, 12, 12], **{"timing/train": [9] * 3, "reward/base_mean": [0.5, 0.5, 0.5],
                                             "train/tokens_trained/base": [900] * 3})
    start = {"w": torch.zeros(2)}
    weights = {"on": {"w": torch.tensor([1.0, 0.5])}, "off": {"w": torch.tensor([1.0, 0.4])}}
    lines = arm_report("cipo", on, off, weights, start)
    assert lines[0] == "CIPO: skip on / off = 0.50 (6.00 / 12.00 s/step; goal <= 0.6: met)"
    assert "response tokens trained 300" in lines[1] and "response tokens trained 900" in lines[2]
    assert "reward/base_mean 0.2500" in lines[3]
    assert "max |on - off| 1.00e-01 (training moved them by up to 1.00e+00 from the start)" in lines[4]


def test_the_study_configuration_curves_are_drawn_per_arm(tmp_path) -> None:
    from benchmarks.speed.zero_advantage_skip import plot_curves

    grpo_metrics = {"reward/base_mean": [0.5, 0.25, 0.5], "reward/correction_mean": [None] * 3}  # as GRPO logs them
    grpo = {name: summary("ours", [30, 6, 6], **grpo_metrics) for name in ("on", "off")}
    cipo = {name: summary("ours", [30, 6, 6], **{"reward/base_mean": [0.5] * 3, "reward/correction_mean": [0.1] * 3})
            for name in ("on", "off")}
    plot_curves({"grpo": grpo, "cipo": cipo}, tmp_path / "curves.png")  # GRPO has no correction curve to draw
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
