"""The plot of a run: losses, schedules, collapse signals and k-NN accuracy over the steps, as a PNG."""

import csv
import os

import numpy as np

from keras_dinov2.run.directory import RunDirectory


def plot_metrics(csv_path, png_path, keys=None):
    """Draws the losses, schedules and collapse signals of a metrics CSV into a PNG.

    Args:
        csv_path: str. A `metrics.csv` written by `StepLogger`; the `epochs.csv` beside it adds its
            columns (k-NN accuracy).
        png_path: str. Output image.
        keys: optional list of column groups; default losses, schedules, teacher signals and
            k-NN accuracy where present.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan
                             for r in rows]) for k in (rows[0] if rows else [])}

    columns = read(csv_path)
    if not columns:
        raise ValueError(f"{csv_path} has no rows to plot.")
    epochs_path = RunDirectory(os.path.dirname(csv_path)).epochs_path
    epoch_columns = read(epochs_path) if os.path.exists(epochs_path) else {}
    # A distillation run adds per-student losses ("student_1/loss") and one k-NN column per backbone.
    student_losses = [k for k in columns if k.startswith("student_") and k.endswith("/loss")]
    knn = [k for k in list(columns) + list(epoch_columns) if k.startswith("knn_top1")]
    groups = keys or [
        ["loss", "dino_local", "dino_global", "ibot", "koleo", "cls", "patch"] + student_losses,
        ["lr", "wd"],
        ["momentum", "teacher_temp"],
        ["teacher_entropy", "teacher_kl_uniform", "teacher_marginal_entropy"],
        sorted(set(knn), key=knn.index),
    ]
    groups = [[k for k in g if k in columns or k in epoch_columns] for g in groups]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.4 * len(groups)), sharex=True)
    axes = np.atleast_1d(axes)

    def series(key):
        source = columns if key in columns else epoch_columns
        values = source[key]
        mask = np.isfinite(values)
        return source["step"][mask], values[mask]

    def scale(key):
        values = np.abs(series(key)[1])
        return float(values.max()) if values.size else 0.0

    for ax, group in zip(axes, groups):
        # Two series of very different scales (learning rate and weight decay, momentum and
        # temperature) get one y axis each, so neither is drawn flat.
        twin = (len(group) == 2 and min(scale(k) for k in group) > 0
                and max(scale(k) for k in group) > 10 * min(scale(k) for k in group))
        lines = []
        for i, key in enumerate(group):
            target = ax.twinx() if twin and i == 1 else ax
            steps, values = series(key)
            lines += target.plot(steps, values, label=key, color=f"C{i}",
                                 marker="o" if len(values) < 30 else None)
            if twin:
                target.set_ylabel(key, color=f"C{i}", fontsize=8)
        ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
