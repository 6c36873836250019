"""Building blocks of the DINOv2 Vision Transformer, one concern per module."""

from keras_dinov2.layers.attention import Attention
from keras_dinov2.layers.block import DropPath, LayerScale, TransformerBlock
from keras_dinov2.layers.embeddings import DINOv2Embeddings, PatchEmbedding
from keras_dinov2.layers.feedforward import MLP, SwiGLU, swiglu_hidden_dim
from keras_dinov2.layers.interpolation import INTERPOLATION_MODES, bicubic_matrix, resample_grid
from keras_dinov2.layers.projector import FeatureProjector

__all__ = [
    "Attention",
    "DINOv2Embeddings",
    "DropPath",
    "FeatureProjector",
    "INTERPOLATION_MODES",
    "LayerScale",
    "MLP",
    "PatchEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "bicubic_matrix",
    "resample_grid",
    "swiglu_hidden_dim",
]
