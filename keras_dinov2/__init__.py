"""keras-dinov2: DINOv2 self-supervised pretraining of Vision Transformers for Keras 3."""

__version__ = "0.1.0.dev0"
