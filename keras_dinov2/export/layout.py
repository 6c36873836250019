"""A backbone's weights as NumPy arrays in the reference's (torch-hub) names and layouts.

Every export goes through this one dictionary: the transformers writer renames it, the
keras-hub writer reshapes it into keras-hub's variables, and the keras-hub importer builds it
from keras-hub's variables and hands it to `interop.assign_torch_hub_weights`.
"""

import keras
import numpy as np

from keras_dinov2.interop import torch_hub_layout


def torch_hub_tensors(backbone, layer_scale_ones=False):
    """Returns {torch-hub key: float32 array in torch layout} for a DINOv2Backbone.

    Dense kernels become (out, in) Linear weights and the patch convolution (out, in, kh, kw).

    Args:
        backbone: DINOv2Backbone.
        layer_scale_ones: bool, default False. A backbone built without LayerScale
            (`layer_scale_init=None`) has no gammas; formats that always hold LayerScale get
            gammas of one (the identity) when this is True.

    Example:
    >>> tensors = torch_hub_tensors(backbone)
    >>> tensors["blocks.0.attn.qkv.weight"].shape   # (3 * D, D)
    """
    out = {}
    for key, variable, how in torch_hub_layout(backbone):
        value = np.asarray(keras.ops.convert_to_numpy(variable), dtype="float32")
        if how == "linear":
            value = value.T
        elif how == "conv":
            value = value.transpose(3, 2, 0, 1)
        out[key] = np.ascontiguousarray(value)
    if layer_scale_ones and backbone.layer_scale_init is None:
        ones = np.ones((backbone.hidden_dim,), "float32")
        for i in range(backbone.num_layers):
            out[f"blocks.{i}.ls1.gamma"] = ones.copy()
            out[f"blocks.{i}.ls2.gamma"] = ones.copy()
    return out
