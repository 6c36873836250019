"""DINO v1 against DINOv2 on the bundled digits: the same backbone and epochs, a few seeds and batch sizes.

Each run is the command a user would type, in its own process:

    keras-dinov2 pretrain --recipe RECIPE --batch-size B --steps-per-epoch ceil(1347 / B) --seed S --knn-every 0
    keras-dinov2 evaluate --preset RUN --linear --linear-lrs 0.001,0.003,...,10 --output RUN/eval.json

and gives one JSON line: the teacher's k-NN (k=20) and linear-probe accuracy (over a learning-rate grid to 10,
wider than the reference's, which ends at 0.1: DINO v1's features still gain at 0.1) on the 450 held-out digits,
the seconds per epoch (the pretrain command's wall time over its epochs, start-up and compilation included),
whether the run collapsed and whether the collapse monitor warned. Collapsed, judged from metrics.csv and not by
the monitor's rule of 20 consecutive steps: over the last epoch the teacher's targets were uniform (mean KL to
uniform below 0.01 nats) or sent every image to the same few prototypes (the batch-mean target's entropy below
5% of log K). The printed table (markdown) has the mean and spread over seeds per recipe and batch.

    KERAS_BACKEND=jax python tools/compare_dino_versions.py --seeds 0 1 2 --batch-sizes 32 16 8 \\
        --out runs/v1_vs_v2 --jsonl runs/v1_vs_v2/results.jsonl

Runs already in --jsonl (same recipe, batch and seed) are not redone: the command resumes a sweep.
"""

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time

TRAIN_IMAGES = 1347  # the digits' training split (keras_dinov2.data.digits_source)
RECIPES = {"digits": "DINOv2", "dino_digits": "DINO v1"}
LINEAR_LRS = "0.001,0.003,0.01,0.03,0.1,0.3,1,3,10"
WARNING = "The run looks collapsed"


def collapsed(run_dir, uniform_kl=0.01, marginal_fraction=0.05):
    """(collapsed, kind) from the last epoch of a run's metrics.csv."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    last_epoch = max(int(r["epoch"]) for r in rows)
    last = [r for r in rows if int(r["epoch"]) == last_epoch]
    kl = statistics.mean(float(r["teacher_kl_uniform"]) for r in last)
    marginal = statistics.mean(float(r["teacher_marginal_entropy"]) for r in last)
    log_k = kl + statistics.mean(float(r["teacher_entropy"]) for r in last)
    if kl < uniform_kl:
        return True, "uniform", kl, marginal / log_k
    if marginal < marginal_fraction * log_k:
        return True, "one-prototype", kl, marginal / log_k
    return False, "", kl, marginal / log_k


def run(cmd, log_path, env):
    start = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log_path}")
    return time.time() - start


def one_run(recipe, batch, seed, epochs, out, env):
    name = f"{recipe}_b{batch}_s{seed}"
    run_dir = os.path.join(out, name)
    steps = math.ceil(TRAIN_IMAGES / batch)
    cli = [sys.executable, "-m", "keras_dinov2.cli"]
    seconds = run(cli + ["pretrain", "--recipe", recipe, "--batch-size", str(batch), "--steps-per-epoch",
                         str(steps), "--epochs", str(epochs), "--seed", str(seed), "--knn-every", "0",
                         "--verbose", "2", "--out", run_dir], os.path.join(out, f"{name}.log"), env)
    with open(os.path.join(out, f"{name}.log")) as f:
        warned = WARNING in f.read()
    evaluation = evaluate(run_dir, os.path.join(out, f"{name}.eval.log"), env)
    is_collapsed, kind, kl, marginal = collapsed(run_dir)
    return {"recipe": recipe, "method": RECIPES[recipe], "batch": batch, "seed": seed, "epochs": epochs,
            "steps_per_epoch": steps, "backend": env.get("KERAS_BACKEND", "jax"),
            "knn20": round(_knn20(evaluation), 2), "linear": round(_linear(evaluation), 2),
            "linear_lr": evaluation["linear"]["learning_rate"],
            "random_init_knn20": round(_knn20(evaluation, "random_init"), 2),
            "seconds_per_epoch": round(seconds / epochs, 2), "collapsed": is_collapsed, "collapse_kind": kind,
            "last_epoch_kl_uniform": round(kl, 4), "last_epoch_marginal_fraction": round(marginal, 4),
            "monitor_warned": warned}


def evaluate(run_dir, log_path, env, random_init=True):
    """`keras-dinov2 evaluate --linear` of a run into RUN/eval.json; returns its result."""
    eval_json = os.path.join(run_dir, "eval.json")
    flags = [] if random_init else ["--no-random-init"]
    run([sys.executable, "-m", "keras_dinov2.cli", "evaluate", "--preset", run_dir, "--linear", "--linear-lrs",
         LINEAR_LRS, "--output", eval_json] + flags, log_path, env)
    with open(eval_json) as f:
        return json.load(f)


def _knn20(evaluation, which=None):
    knn = (evaluation[which] if which else evaluation)["knn"]  # JSON keys are strings
    return float(knn["20"])


def _linear(evaluation):
    return float(evaluation["linear"]["accuracy"])


def table(rows):
    """Markdown: per method and batch, mean (min-max) over seeds, collapses and monitor warnings."""
    lines = ["| method | batch | seeds | teacher k-NN (k=20) | linear probe | s / epoch | collapsed | monitor warned |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["method"], r["batch"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    for method, batch in keys:
        group = [r for r in rows if (r["method"], r["batch"]) == (method, batch)]

        def cell(key, group=group):
            values = [r[key] for r in group]
            return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"

        lines.append(f"| {method} | {batch} | {len(group)} | {cell('knn20')} | {cell('linear')} | "
                     f"{statistics.mean(r['seconds_per_epoch'] for r in group):.1f} | "
                     f"{sum(r['collapsed'] for r in group)} of {len(group)} | "
                     f"{sum(r['monitor_warned'] for r in group)} of {len(group)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 16, 8])
    parser.add_argument("--epochs", type=int, default=14, help="epochs of every run (default 14, the recipes')")
    parser.add_argument("--out", default="runs/v1_vs_v2", help="folder for the run directories and logs")
    parser.add_argument("--jsonl", default=None, help="results file (default OUT/results.jsonl); appended")
    parser.add_argument("--table-only", action="store_true", help="print the table of --jsonl and stop")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate the runs of --jsonl again (k-NN and linear probe) and rewrite it")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.epochs < 1:
        parser.error("--batch-sizes and --epochs must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    jsonl = args.jsonl or os.path.join(args.out, "results.jsonl")
    rows = []
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if args.reevaluate:
        env = dict(os.environ)
        env.setdefault("KERAS_BACKEND", "jax")
        for row in rows:
            name = f"{row['recipe']}_b{row['batch']}_s{row['seed']}"
            evaluation = evaluate(os.path.join(args.out, name), os.path.join(args.out, f"{name}.eval.log"), env,
                                  random_init=False)  # the row keeps its random-init k-NN
            row.update(knn20=round(_knn20(evaluation), 2), linear=round(_linear(evaluation), 2),
                       linear_lr=evaluation["linear"]["learning_rate"])
            print(json.dumps(row), flush=True)
        with open(jsonl, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif not args.table_only:
        env = dict(os.environ)
        env.setdefault("KERAS_BACKEND", "jax")
        done = {(r["recipe"], r["batch"], r["seed"], r["epochs"]) for r in rows}
        for batch in args.batch_sizes:
            for seed in args.seeds:
                for recipe in args.recipes:
                    if (recipe, batch, seed, args.epochs) in done:
                        continue
                    row = one_run(recipe, batch, seed, args.epochs, args.out, env)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
