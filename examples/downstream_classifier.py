"""A downstream Keras app on a DINOv2 backbone: a linear classifier on frozen features, then fine-tuning.

The backbone comes from `DINOv2Backbone.from_preset`: the `teacher_preset/` folder that `keras-dinov2 pretrain`
writes into its run directory (or the run directory itself), a folder from `keras-dinov2 convert` or
`keras-dinov2 export`, or an `hf://user/repo` URI. The classifier is an ordinary `keras.Model`: images -> backbone
-> CLS token -> Dense. It is trained on the bundled handwritten digits (no download), in two stages:

1. Linear probe: the backbone is frozen and only the Dense layer learns (on standardized CLS tokens).
2. Fine-tuning: every weight learns, with layer-wise learning-rate decay. Block i of L gets the learning rate
   `lr * decay ** (L - i)`, the embeddings (patch, position, CLS tokens) `lr * decay ** (L + 1)` and the final
   norm and the classifier the full `lr`: layers near the input, which hold the most general features, move
   least. `keras_dinov2.optim.param_groups` computes exactly these multipliers (it is what pretraining uses) and
   `keras_dinov2.optim.DINOv2AdamW` applies them to each variable's AdamW update, with no weight decay on biases,
   norms and LayerScale.

Usage:
    python examples/downstream_classifier.py --preset runs/latest            # after `keras-dinov2 pretrain`
    python examples/downstream_classifier.py                                 # random tiny backbone (a warning)
    python examples/downstream_classifier.py --quick                         # a few hundred images, 1 epoch each

It prints the test accuracy after each stage.
"""

import argparse
import os
import sys
import time

import keras


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a classifier on a DINOv2 backbone's frozen CLS token, then fine-tune the whole "
                    "model with layer-wise learning-rate decay, on the bundled digits.")
    parser.add_argument("--preset", default=None,
                        help="run directory, preset folder or hf:// URI (default: a randomly initialized "
                             "dinov2_vit_tiny4, with a warning)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side in pixels (default: the backbone's image_size)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--epochs", type=int, default=10, help="linear-probe epochs (default 10)")
    parser.add_argument("--lr", type=float, default=1e-2, help="linear-probe learning rate (default 1e-2)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3,
                        help="peak fine-tuning learning rate of the classifier (default 1e-3)")
    parser.add_argument("--layer-decay", type=float, default=0.75,
                        help="layer-wise learning-rate decay (default 0.75; 1 disables it)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="256 training and 128 test images, one epoch per stage (a smoke test)")
    return parser.parse_args(argv)


def load_backbone(preset):
    from keras_dinov2 import DINOv2Backbone

    if preset is None:
        print("WARNING: no --preset given; using a randomly initialized dinov2_vit_tiny4. Its features are "
              "not pretrained, so the linear probe is weak. Pass the run directory of `keras-dinov2 pretrain` "
              "for a real backbone.")
        return DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)
    if os.path.isdir(os.path.join(preset, "teacher_preset")):
        preset = os.path.join(preset, "teacher_preset")
    return DINOv2Backbone.from_preset(preset)


def build_classifier(backbone, image_size, num_classes, train_features):
    """images -> backbone -> CLS token -> standardization -> Dense logits; returns (model, Dense layer).

    The standardization uses the mean and variance of the training set's CLS tokens (a Normalization layer,
    fixed after `adapt`): DINO features sit far from the origin with a small spread per dimension, which a
    linear layer trained with one Adam learning rate handles poorly without it.
    """
    normalization = keras.layers.Normalization(name="standardize")
    normalization.adapt(train_features)
    images = keras.Input((image_size, image_size, 3), name="images")
    features = normalization(backbone(images)["cls_token"])
    head = keras.layers.Dense(num_classes, name="classifier")
    return keras.Model(images, head(features), name="digits_classifier"), head


def compile_model(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def layer_decay_optimizer(backbone, head, learning_rate, layer_decay, weight_decay, total_steps):
    """AdamW whose update of each variable is scaled by its layer's learning-rate multiplier."""
    from keras_dinov2.optim import DINOv2AdamW, param_groups

    # patch_embed_lr_mult=1: the extra 0.2 on the patch embedding is a pretraining stabilizer, not part of the
    # usual fine-tuning recipe.
    groups = param_groups(backbone, heads={"classifier": head}, layer_decay=layer_decay,
                          patch_embed_lr_mult=1.0)
    warmup = max(1, total_steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=learning_rate, warmup_steps=warmup)
    return DINOv2AdamW(learning_rate=schedule, weight_decay=weight_decay, param_groups=groups), groups


def describe_multipliers(groups):
    """One "section xmultiplier" entry per layer id, e.g. "embeddings x0.237, block_0 x0.316, ..."."""
    names, multipliers = {}, {}
    for _, group in groups.items():
        section = group.name.split("/")[1] if group.part == "backbone" else group.part
        section = {"top": "final norm", "patch_embed": "embeddings"}.get(section, section)
        names.setdefault(group.layer_id, dict.fromkeys([]))[section] = None
        multipliers[group.layer_id] = group.lr_multiplier
    return ", ".join(f"{' + '.join(names[i])} x{multipliers[i]:.3g}" for i in sorted(names))


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    import tensorflow as tf

    from keras_dinov2.data import eval_dataset
    from keras_dinov2.evaluation import extract_features

    start = time.time()
    backbone = load_backbone(args.preset)
    size = args.image_size or backbone.image_size
    train = eval_dataset("digits", size, args.batch_size, split="train")
    test = eval_dataset("digits", size, args.batch_size, split="test")
    epochs, finetune_epochs = args.epochs, args.finetune_epochs
    if args.quick:
        train = train.take(max(1, 256 // args.batch_size))
        test = test.take(max(1, 128 // args.batch_size))
        epochs = finetune_epochs = 1
    train_features, _ = extract_features(backbone, train, verbose=False)
    num_train = len(train_features)
    num_test = sum(int(labels.shape[0]) for _, labels in test)
    # eval_dataset yields the images in a fixed order; training wants a new order every epoch.
    train = (train.unbatch().apply(tf.data.experimental.assert_cardinality(num_train)).cache()
             .shuffle(num_train, seed=args.seed).batch(args.batch_size))
    print(f"Backend {keras.backend.backend()}; backbone {backbone.num_layers} blocks, width {backbone.hidden_dim}, "
          f"patch {backbone.patch_size}; digits at {size} px: {num_train} training, {num_test} test images.")

    model, head = build_classifier(backbone, size, 10, train_features)

    # Stage 1: linear probe on the frozen CLS token.
    backbone.trainable = False
    compile_model(model, keras.optimizers.Adam(args.lr))
    model.fit(train, epochs=epochs, shuffle=False, verbose=0)
    frozen = model.evaluate(test, verbose=0, return_dict=True)["accuracy"] * 100
    print(f"Linear probe (frozen backbone, {epochs} epochs): test accuracy {frozen:.1f}%")

    # Stage 2: fine-tune everything with layer-wise learning-rate decay.
    backbone.trainable = True
    steps = finetune_epochs * int(train.cardinality())
    optimizer, groups = layer_decay_optimizer(backbone, head, args.finetune_lr, args.layer_decay,
                                              args.weight_decay, steps)
    print(f"Fine-tuning learning-rate multipliers (decay {args.layer_decay}): {describe_multipliers(groups)}")
    compile_model(model, optimizer)
    model.fit(train, epochs=finetune_epochs, shuffle=False, verbose=0)
    tuned = model.evaluate(test, verbose=0, return_dict=True)["accuracy"] * 100
    print(f"Fine-tuned (layer-wise lr decay, {finetune_epochs} epochs): test accuracy {tuned:.1f}%")
    print(f"Accuracy before fine-tuning {frozen:.1f}%, after {tuned:.1f}% ({time.time() - start:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
