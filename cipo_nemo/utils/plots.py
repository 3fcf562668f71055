"""A PNG of the curves an RL researcher looks at first: reward, pass rate, correction success and retention, rho."""

from __future__ import annotations

from pathlib import Path

from cipo_nemo.utils.logger import read_metrics

CURVES = (
    ("reward", ("reward/base_mean", "reward/correction_mean")),
    ("pass rate", ("reward/base_pass_rate", "val/pass@1")),
    ("correction", ("cipo/correction_success", "cipo/retention")),
    ("rho and loss", ("cipo/rho", "train/loss")),
)


def plot_training_curves(run_dir: Path, filename: str = "curves.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(run_dir)
    figure, axes = plt.subplots(1, len(CURVES), figsize=(4.5 * len(CURVES), 3.4))
    for axis, (title, keys) in zip(axes, CURVES):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o", markersize=3, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    path = run_dir / filename
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
