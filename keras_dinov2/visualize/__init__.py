"""Pictures of what a backbone sees: PCA of its patch features and the CLS token's attention maps.

Two views, as in the DINO and DINOv2 papers:

- `pca_image`: the first three principal components of the final-norm patch tokens, one per RGB channel. With
  `background_threshold`, a first PCA separates foreground from background on its first component, and a second
  PCA on the foreground patches alone gives the colours (the DINOv2 paper's Figure 1 procedure). Several images
  share one PCA, so the same part of different objects gets the same colour.
- `attention_maps`: the CLS token's attention over the patches in the last block, one map per head.

`save_figure` writes both as one PNG grid, one row per image: input | PCA | head 1 ... head h | mean of heads.
Everything runs on any Keras backend and any input size that is a multiple of the patch size (the position
embeddings are interpolated); images come from files, NumPy arrays or scikit-image's bundled pictures
(`"skimage:astronaut"`), so the pictures can be made offline.

Example:
    >>> from keras_dinov2 import DINOv2Backbone, visualize
    >>> backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)
    >>> rgb = visualize.pca_image(backbone, "skimage:chelsea", size=64)       # uint8 (64, 64, 3)
    >>> maps = visualize.attention_maps(backbone, "skimage:chelsea", size=64)
    >>> maps["attention"].shape                                              # (3, 16, 16): heads, grid

The modules, one concern each:
    images      loading, resizing and normalizing images; upsampling maps to pixels
    forward     the one compiled forward: final-norm patch tokens and the last block's CLS attention
    pca         the joint PCA of patch features, with optional foreground separation
    attention   per-head CLS attention maps and their overlays
    figure      the PNG grid
"""

from keras_dinov2.visualize.attention import attention_maps
from keras_dinov2.visualize.figure import save_figure
from keras_dinov2.visualize.forward import patch_features
from keras_dinov2.visualize.images import SKIMAGE_PREFIX, UPSAMPLING, load_image, prepare_images
from keras_dinov2.visualize.pca import patch_pca, pca_image

__all__ = [
    "SKIMAGE_PREFIX",
    "UPSAMPLING",
    "attention_maps",
    "load_image",
    "patch_features",
    "patch_pca",
    "pca_image",
    "prepare_images",
    "save_figure",
]
