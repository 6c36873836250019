"""k-NN accuracy over the epochs of several runs in one figure, from their epochs.csv files.

    python tools/plot_knn_curves.py --out docs/distill_digits.png \\
        --curve "distilled, heads (EMA student)=runs/cli_heads:knn_top1_ema_student" \\
        --curve "distilled, features (EMA student)=runs/cli_features:knn_top1_ema_student" \\
        --curve "from scratch (its EMA teacher)=runs/cli_scratch:knn_top1" \\
        --curve "teacher=runs/cli_heads:knn_top1_teacher"

Each --curve is LABEL=RUN_DIR:COLUMN; a column whose values never change (a frozen teacher's) is drawn dashed.
"""

import argparse
import csv
import os


def read_curve(run_dir, column):
    """(epochs, values) of `column` in `run_dir`/epochs.csv, rows where it was logged."""
    path = os.path.join(run_dir, "epochs.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: give a run directory written by pretrain or distill.")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(column) not in (None, "")]
    if not rows:
        raise SystemExit(f"{path} has no {column!r} values.")
    return [int(float(r["epoch"])) for r in rows], [float(r[column]) for r in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curve", action="append", required=True, metavar="LABEL=RUN_DIR:COLUMN",
                        help="one curve; repeat for several")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--title", default="k-NN top-1 (k=20) on the 450 held-out digits")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, spec in enumerate(args.curve):
        label, _, where = spec.partition("=")
        run_dir, _, column = where.rpartition(":")
        if not (label and run_dir and column):
            raise SystemExit(f"--curve {spec!r}: expected LABEL=RUN_DIR:COLUMN.")
        epochs, values = read_curve(run_dir, column)
        constant = len(set(values)) == 1
        ax.plot(epochs, values, label=f"{label} ({values[-1]:.1f}%)", color=f"C{i}",
                linestyle="--" if constant else "-", marker=None if constant else "o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 %")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"Wrote {args.out}.")


if __name__ == "__main__":
    main()
