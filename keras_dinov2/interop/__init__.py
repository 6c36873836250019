"""Every weight format the library reads, bounds-checked, and one `load_backbone(source)`.

Readers of official torch-hub `.pth` state dicts of DINOv2 and DINO v1 (read without torch: an
unpickler that only rebuilds tensors), Hugging Face transformers folders (Dinov2 and DINO v1's
ViT; safetensors or pytorch_model.bin),
keras-hub DINOV2Backbone presets, and our own presets with their heads. Every tensor is first
renamed to the torch-hub layout, then copied into a `DINOv2Backbone` with its shape checked.

The readers treat every file as hostile: each tensor record of a pickled state dict is
checked against its storage before any view of it is made, a configuration is checked
against sane bounds and against the tensors present before a model is built, and a folder's
files must stay inside the folder. Every malformed input raises `CheckpointError`.

`load_backbone(source)` is the one loader: the command line, the exporter and
`DINOv2Backbone.from_preset` (through the backbone's preset-loader registry, filled when this
package is imported) all use it. `keras_dinov2.convert` is this package under its older name.

Modules: files (bounded file readers, CheckpointError), torch_file (torch.save archives),
architecture (config and tensor checks), torch_hub, transformers, keras_hub, checks (preset
folders), preset (our heads), load (load_backbone).

Example:
>>> from keras_dinov2.interop import load_backbone, load_torch_hub_checkpoint
>>> backbone = load_torch_hub_checkpoint("dinov2_vits14_pretrain.pth")   # no torch needed
>>> backbone = load_backbone("path/to/dinov2-small")                      # a transformers folder
"""

from keras_dinov2.interop.architecture import (
    backbone_variable_shapes,
    check_backbone_config,
    check_config_against_tensors,
    tensor_architecture,
)
from keras_dinov2.interop.checks import (
    KERAS_HUB_CLASS,
    OUR_CLASS,
    check_backbone_preset,
    check_keras_hub_preset,
    check_preset_folder,
    keras_hub_variable_shapes,
)
from keras_dinov2.interop.files import (
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_MLP_RATIO,
    MAX_PATCH_SIZE,
    MAX_POSITIONS,
    MAX_REGISTERS,
    MAX_WIDTH,
    CheckpointError,
    folder_file,
    read_json,
    reading,
)
from keras_dinov2.interop.keras_hub import import_keras_hub_preset, keras_hub_to_torch_hub
from keras_dinov2.interop.load import (
    UnknownSourceError,
    check_source,
    load_architecture,
    load_backbone,
    load_folder,
)
from keras_dinov2.interop.preset import (
    exported_head_config,
    load_heads,
    read_heads_config,
    restore_heads,
    save_heads,
)
from keras_dinov2.interop.torch_file import read_torch_state_dict
from keras_dinov2.interop.torch_hub import (
    assign_torch_hub_weights,
    backbone_from_parts,
    complete_dino_v1,
    load_torch_hub_checkpoint,
    torch_hub_layout,
    torch_hub_parts,
)
from keras_dinov2.interop.transformers import (
    load_transformers_checkpoint,
    transformers_config_to_backbone_config,
    transformers_parts,
    vit_config_to_backbone_config,
)

__all__ = [
    "KERAS_HUB_CLASS",
    "MAX_IMAGE_SIZE",
    "MAX_LAYERS",
    "MAX_MLP_RATIO",
    "MAX_PATCH_SIZE",
    "MAX_POSITIONS",
    "MAX_REGISTERS",
    "MAX_WIDTH",
    "OUR_CLASS",
    "CheckpointError",
    "UnknownSourceError",
    "assign_torch_hub_weights",
    "backbone_from_parts",
    "backbone_variable_shapes",
    "check_backbone_config",
    "check_backbone_preset",
    "check_config_against_tensors",
    "check_keras_hub_preset",
    "check_preset_folder",
    "check_source",
    "complete_dino_v1",
    "exported_head_config",
    "folder_file",
    "import_keras_hub_preset",
    "keras_hub_to_torch_hub",
    "keras_hub_variable_shapes",
    "load_architecture",
    "load_backbone",
    "load_folder",
    "load_heads",
    "load_torch_hub_checkpoint",
    "load_transformers_checkpoint",
    "read_heads_config",
    "read_json",
    "read_torch_state_dict",
    "reading",
    "restore_heads",
    "save_heads",
    "tensor_architecture",
    "torch_hub_layout",
    "torch_hub_parts",
    "transformers_config_to_backbone_config",
    "transformers_parts",
    "vit_config_to_backbone_config",
]
