"""Export trained backbones: our preset, keras-hub presets, transformers folders, the Hub.

From a run directory the exported network is the EMA teacher of the newest checkpoint, the
network the DINOv2 reference releases. Three formats:

- "keras_dinov2": our preset (`DINOv2Backbone.from_preset(folder)`: masks, any input size),
  optionally with the teacher's DINO / iBOT heads and centers to continue pretraining
  (`load_heads`, `restore_heads`);
- "keras_hub": a stock keras-hub `DINOV2Backbone` preset with its image converter, loaded by
  keras-hub alone (`keras_hub.models.Backbone.from_preset(folder)`);
- "transformers": config.json + model.safetensors for `transformers.AutoModel` (Dinov2Model or
  Dinov2WithRegistersModel), which keras-hub's transformers converter also reads.

Every export is loaded back and compared with the source at the stored size and at an
interpolated size (`ExportVerificationError` above the tolerance), gets a model card
(README.md with Hub metadata), and can be pushed with `push_to_hub`. `import_keras_hub_preset`
goes the other way. The readers (`load_backbone`, `import_keras_hub_preset`, `check_preset_folder`,
`load_heads`, `restore_heads`, `save_heads`) live in `keras_dinov2.interop` and are named here too.

Example:
>>> from keras_dinov2.export import export
>>> export("runs/latest", "exports/digits-hub", format="keras_hub", push="hf://me/dinov2-digits")
"""

from keras_dinov2.export.api import FORMATS, ExportResult, exactness_rows, export, load_source
from keras_dinov2.export.hub import UploadError, parse_repo, push_to_hub
from keras_dinov2.export.keras_hub_format import to_keras_hub
from keras_dinov2.export.source import ExportSource, load_preset_source, load_run
from keras_dinov2.export.transformers_format import (
    save_transformers,
    transformers_config,
    transformers_model_type,
)
from keras_dinov2.export.verify import ExportVerificationError, ExportWarning
from keras_dinov2.interop import (
    check_preset_folder,
    import_keras_hub_preset,
    load_backbone,
    load_heads,
    restore_heads,
    save_heads,
)

__all__ = [
    "FORMATS",
    "ExportResult",
    "ExportSource",
    "ExportVerificationError",
    "ExportWarning",
    "UploadError",
    "check_preset_folder",
    "exactness_rows",
    "export",
    "import_keras_hub_preset",
    "load_backbone",
    "load_heads",
    "load_preset_source",
    "load_run",
    "load_source",
    "parse_repo",
    "push_to_hub",
    "restore_heads",
    "save_heads",
    "save_transformers",
    "to_keras_hub",
    "transformers_config",
    "transformers_model_type",
]
