"""keras-dinov2: DINOv2 self-supervised pretraining of Vision Transformers for Keras 3.

Public names:
    DINOv2Backbone   the reference ViT as a keras-hub Backbone (presets, masks, any input size)
    DINOHead         the DINO / iBOT projection head with weight-normalized prototypes
    convert          loaders for official torch-hub checkpoints and transformers folders
    losses           DINO and iBOT cross-entropy, centering, Sinkhorn-Knopp, KoLeo
    layers           the building blocks
"""

from keras_dinov2 import convert, layers, losses
from keras_dinov2.backbone import ARCHITECTURES, DINOv2Backbone
from keras_dinov2.layers.dino_head import DINOHead

__version__ = "0.1.0.dev0"

__all__ = ["ARCHITECTURES", "DINOHead", "DINOv2Backbone", "convert", "layers", "losses"]
