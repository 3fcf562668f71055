"""benchmarks/speed/async_speed.py's bookkeeping (the benchmark itself runs many minutes and is not a test): where the
time goes from the loop's own stage timers, the async/sync ratio, --quick's warm-up, and the curves' figure."""

import pytest

from benchmarks.speed.async_speed import parse_args, plot_curves, report, where_time_goes


def summary(step_s: list[float], *, other_share: float = 0.01, **per_step: list[float]) -> dict:
    steps = [{"seconds": s, "tokens/generated": 100.0, "tokens/base_sequence": 300.0,
              "tokens/correction_sequence": 100.0, "reward/base_mean": 0.5,
              **{key: values[i] for key, values in per_step.items()}} for i, s in enumerate(step_s)]
    return {"steps": steps, "cpu": {"wall_s": 100.0, "own_cpu_s": 180.0, "other_cpu_s": other_share * 100,
                                    "other_share": other_share}}


def sync_run() -> dict:  # the stages alternate: sampling 6 s, training 3 s of each 10 s step
    return summary([30, 20, 10, 10, 10], **{"timing/rollout": [5] * 5, "timing/verify": [1] * 5,
                                           "timing/train": [2] * 5, "timing/refit": [1] * 5})


def async_run() -> dict:  # sampling 6 s in the background, training 3 s, waiting 3 s of each 6 s step
    return summary([30, 20, 6, 6, 6], **{"async/generation_s": [6] * 5, "timing/train": [2] * 5,
                                         "timing/refit": [1] * 5, "timing/wait_for_rollouts": [3] * 5})


def test_where_time_goes_reads_the_stage_timers_after_the_warm_up() -> None:
    sync = where_time_goes(sync_run(), warm_up=2)
    assert sync["s_per_step"] == 10 and sync["generation_busy"] == pytest.approx(0.6)
    assert sync["trainer_busy"] == pytest.approx(0.3) and sync["trainer_wait"] == 0
    assert sync["generated_tokens_per_s"] == pytest.approx(300 / 30) and sync["processed_tokens_per_s"] == 40
    overlapped = where_time_goes(async_run(), warm_up=2)  # the background's own seconds, not the stage timers
    assert overlapped["generation_busy"] == 1 and overlapped["trainer_wait"] == pytest.approx(0.5)
    assert where_time_goes(async_run(), warm_up=0)["generated_tokens_per_s"] == pytest.approx(500 / 68)  # all 5


def test_report_gives_the_ratio_and_flags_a_contaminated_run() -> None:
    args = parse_args(["--sides", "sync_grpo", "async_grpo"])
    noisy = async_run() | {"cpu": {"wall_s": 100.0, "own_cpu_s": 150.0, "other_cpu_s": 20.0, "other_share": 0.2}}
    lines = report({"sync_grpo": sync_run(), "async_grpo": noisy}, args)
    assert lines[0].endswith("steps 3..8 (medians)")
    assert "CONTAMINATED" in next(line for line in lines if line.startswith("async_grpo"))
    assert "CONTAMINATED" not in next(line for line in lines if line.startswith("sync_grpo"))
    assert "GRPO: async step / sync step = 0.60" in lines


def test_quick_is_two_steps_with_one_warm_up_and_no_curves() -> None:
    args = parse_args(["--quick"])
    assert (args.steps, args.warm_up, args.curve_steps) == (2, 1, 0)
    with pytest.raises(SystemExit):
        parse_args(["--steps", "3"])  # two warm-up steps leave one timed step: no median worth printing


def test_curves_are_drawn(tmp_path) -> None:
    curves = {"sync_cipo": sync_run(), "async_cipo": async_run()}
    curves["async_cipo"]["steps"][0]["cipo/retention"] = 0.5
    plot_curves(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
