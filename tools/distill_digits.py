"""Distillation on the bundled digits: a trained digits teacher into dinov2_vit_micro4, against the same student
pretrained from scratch for the same epochs; k-NN (k=20, held-out digits) and minutes of each, one line per run.

    KERAS_BACKEND=jax python tools/distill_digits.py --teacher runs/teacher100 --seeds 0 1 2 --epochs 14

--mode heads: DINOv2's recipe from the run's teacher and heads; --mode features: from the teacher backbone alone
(cosine regression of CLS and patch tokens); --mode scratch: the digits pretraining recipe on the student alone.
"""

import argparse
import dataclasses
import json
import time

import keras


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a digits pretraining run directory (with checkpoints)")
    parser.add_argument("--student", default="dinov2_vit_micro4", help="student architecture (patch 4)")
    parser.add_argument("--modes", nargs="+", default=["heads", "features", "scratch"],
                        choices=["heads", "features", "scratch"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--students", type=int, default=1, help="students in one run (same architecture)")
    parser.add_argument("--out", default=None, help="append one JSON line per run to this file")
    args = parser.parse_args(argv)

    from keras_dinov2.backbone import build_backbone
    from keras_dinov2.config import SSLConfig
    from keras_dinov2.data import multicrop_dataset
    from keras_dinov2.evaluation import evaluate_digits
    from keras_dinov2.pretrainer import DINOv2Pretrainer, DistillationPretrainer, FeatureDistiller
    from keras_dinov2.run import load_teacher

    teacher, heads, teacher_config = load_teacher(args.teacher)
    teacher_knn = evaluate_digits(teacher, image_size=24, dtype="float64")[20]
    print(f"teacher {args.teacher}: {teacher.count_params():,} parameters, k-NN {teacher_knn:.2f}%")
    for seed in args.seeds:
        for mode in args.modes:
            base = teacher_config or SSLConfig.recipe("digits")
            config = dataclasses.replace(base, seed=seed, optim=dataclasses.replace(base.optim, epochs=args.epochs))
            if mode != "scratch":  # the paper's distillation: no stochastic depth in the student
                config = dataclasses.replace(config, model=dataclasses.replace(config.model, drop_path_rate=0.0))
            keras.utils.set_random_seed(seed)
            students = [build_backbone(args.student, config) for _ in range(args.students)]
            if mode == "heads":
                model = DistillationPretrainer(teacher, heads, students, config)
            elif mode == "features":
                model = FeatureDistiller(teacher, students, config)
            else:
                model = DINOv2Pretrainer(students[0], config)
            model.compile()
            data = multicrop_dataset("digits", config.batch_size, config.data, patch_size=config.model.patch_size,
                                     seed=seed, repeat=True)
            start = time.time()
            model.fit(data, epochs=args.epochs, steps_per_epoch=config.optim.steps_per_epoch, verbose=0)
            minutes = (time.time() - start) / 60
            if hasattr(model, "jax_state_sync"):
                model.jax_state_sync()
            final = model.teacher if mode == "scratch" else model.ema_students[0]
            knn = evaluate_digits(final, image_size=24, dtype="float64")[20]
            raw = evaluate_digits(students[0], image_size=24, dtype="float64")[20]
            row = {"mode": mode, "seed": seed, "epochs": args.epochs, "students": args.students,
                   "backend": keras.backend.backend(), "params": students[0].count_params(),
                   "knn_ema": round(knn, 2), "knn_student": round(raw, 2), "teacher_knn": round(teacher_knn, 2),
                   "minutes": round(minutes, 2)}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
