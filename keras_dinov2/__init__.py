"""keras-dinov2: DINOv2 self-supervised pretraining of Vision Transformers for Keras 3.

Public names:
    DINOv2Backbone   the reference ViT as a keras-hub Backbone (presets, masks, any input size)
    DINOHead         the DINO / iBOT projection head with weight-normalized prototypes
    DINOv2Pretrainer student, EMA teacher, heads and losses, trained with model.fit
    SSLConfig        every knob of a run with the reference's defaults, and named recipes
    data             sources, multi-crop augmentation and masking as tf.data pipelines
    evaluation       feature extraction, k-NN (reference protocol), linear probe
    interop          weight readers (torch-hub checkpoints, transformers folders, keras-hub and our
                     presets) and the one load_backbone; also named `convert`, as the README does
    losses           DINO and iBOT cross-entropy, centering, Sinkhorn-Knopp, KoLeo
    layers           the building blocks
"""

# First, before anything imports TensorFlow: the command line starts without TensorFlow's start-up lines.
from keras_dinov2 import startup  # noqa: F401, I001
# Importing interop also registers its load_backbone as DINOv2Backbone.from_preset's loader.
from keras_dinov2 import config, interop, layers, losses
from keras_dinov2.backbone import ARCHITECTURES, DINOv2Backbone
from keras_dinov2.config import SSLConfig
from keras_dinov2.layers.dino_head import DINOHead
from keras_dinov2.pretrainer import DINOv2Pretrainer

# Registers the backend train steps with the pretrainer (the modules themselves load on first use).
from keras_dinov2 import trainers  # noqa: F401, E402, I001

# The readers' older name: `kd.convert.load_torch_hub_checkpoint(path)` is documented usage.
convert = interop

__version__ = "0.1.0.dev0"


def __getattr__(name):
    # `data` and `evaluation` import TensorFlow (tf.data): load them on first use, so that
    # `import keras_dinov2` stays light for inference on JAX or torch alone.
    if name in ("data", "evaluation"):
        import importlib

        return importlib.import_module(f"keras_dinov2.{name}")
    raise AttributeError(f"module 'keras_dinov2' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "DINOHead",
    "DINOv2Backbone",
    "DINOv2Pretrainer",
    "SSLConfig",
    "config",
    "convert",
    "data",
    "evaluation",
    "interop",
    "layers",
    "losses",
]
