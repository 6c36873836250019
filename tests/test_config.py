"""Config: field rules and their errors, the dictionary round trip, recipes, and config.json files of older runs."""

import ast
import dataclasses
import json
import os
import pathlib

import pytest

import keras_dinov2.config as config_package
from keras_dinov2.config import (
    DATA_RECIPES,
    FIELD_RULES,
    SSL_RECIPES,
    AugmentationConfig,
    CropConfig,
    DataConfig,
    HeadConfig,
    LossConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    SSLConfig,
    data_and_patch_size,
    upgrade_layout,
)
from keras_dinov2.config.fields import ConfigBase

# Plain Python: backend-independent.
pytestmark = pytest.mark.once

CLASSES = (CropConfig, AugmentationConfig, MaskingConfig, DataConfig, ModelConfig, HeadConfig, LossConfig,
           OptimConfig, SSLConfig)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "config_json")


def test_config_round_trip_and_recipes():
    digits = SSLConfig.recipe("digits")
    assert digits.grid_size == (6, 6) and digits.num_patches == 36
    assert DataConfig.recipe("digits").patch_grid(4) == (6, 6)
    assert (
        digits.data.crops.global_crops_size,
        digits.data.crops.local_crops_size,
        digits.data.crops.local_crops_number,
        digits.model.patch_size,
    ) == (24, 12, 4, 4)
    default = DataConfig()
    assert (
        default.crops.global_crops_size,
        default.crops.local_crops_size,
        default.crops.local_crops_number,
    ) == (224, 98, 8)
    assert default.crops.global_crops_scale == (0.32, 1.0)
    assert default.crops.local_crops_scale == (0.05, 0.32)
    assert DataConfig.recipe("reference_default").crops.local_crops_size == 96
    assert DataConfig.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    for name in SSL_RECIPES:
        recipe = SSLConfig.recipe(name)
        assert SSLConfig.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe, name
        assert recipe is not SSLConfig.recipe(name)  # a fresh copy each time
    for name in DATA_RECIPES:
        assert isinstance(DataConfig.recipe(name), DataConfig)
    with pytest.raises(ValueError, match="recipe"):
        DataConfig.recipe("imagenet")
    with pytest.raises(ValueError, match=r"SSLConfig.recipe: name must be one of \['digits'"):
        SSLConfig.recipe("vit")


def test_model_config_holds_the_student_settings():
    assert SSLConfig().model == ModelConfig(patch_size=14, drop_path_rate=0.3, drop_path_uniform=True,
                                            layer_scale_init=1e-5, position_embedding_init_std=0.02)
    assert SSLConfig.recipe("vitl14").model.drop_path_rate == 0.4
    digits = SSLConfig.recipe("digits").model
    assert digits.stochastic_depth() == {"drop_path_rate": 0.1, "drop_path_uniform": False}
    assert digits.new_backbone_init() == {"layer_scale_init": 1.0, "position_embedding_init_std": 1.0}
    assert ModelConfig(layer_scale_init=None).new_backbone_init()["layer_scale_init"] is None
    moved = {"drop_path_rate", "drop_path_uniform", "layer_scale_init", "position_embedding_init_std"}
    assert not moved & {f.name for f in dataclasses.fields(OptimConfig)}
    assert "patch_size" not in {f.name for f in dataclasses.fields(MaskingConfig)}


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: CropConfig(global_crops_scale=(0.5, 0.2)), "global_crops_scale"),
        (lambda: CropConfig(local_crops_number=-1), "local_crops_number"),
        (lambda: CropConfig(interpolation="cubic"), "interpolation"),
        (lambda: AugmentationConfig(blur_probabilities="paper"), "blur_probabilities"),
        (lambda: AugmentationConfig(blur_probabilities=(1.0, 0.5)), "blur_probabilities"),
        (lambda: AugmentationConfig(blur_kernel_size=8), "blur_kernel_size"),
        (lambda: AugmentationConfig(std=(0.2, 0.0, 0.2)), "std"),
        (lambda: AugmentationConfig(hue=0.6), "hue"),
        (lambda: MaskingConfig(mask_ratio_min_max=(0.6, 0.2)), "mask_ratio_min_max"),
        (lambda: MaskingConfig(max_aspect=0.1), "max_aspect"),
        (lambda: ModelConfig(patch_size=0), "patch_size"),
        (lambda: ModelConfig(drop_path_rate=1.0), "drop_path_rate"),
        (lambda: ModelConfig(drop_path_uniform="yes"), "drop_path_uniform"),
        (lambda: ModelConfig(position_embedding_init_std=0), "position_embedding_init_std"),
        (lambda: HeadConfig(use_bn=1), "use_bn"),
        (lambda: LossConfig(student_temp=0), "student_temp"),
        (lambda: OptimConfig(epochs=0), "epochs"),
        (lambda: OptimConfig(momentum_teacher=1.5), "momentum_teacher"),
        (lambda: SSLConfig(seed=-1), "seed"),
        (lambda: SSLConfig(heads=3), "heads"),
        (lambda: SSLConfig(data=DataConfig(crops=CropConfig(global_crops_size=30))), "global_crops_size"),
        (lambda: SSLConfig(data=DataConfig.recipe("digits")), "local_crops_size|global_crops_size"),
        (lambda: DataConfig(crops=CropConfig(global_crops_size=8, local_crops_size=8),
                            augmentation=AugmentationConfig(blur_kernel_size=17)), "blur_kernel_size"),
        (lambda: DataConfig.from_dict({"crops": {}, "colour": {}}), "unknown keys"),
    ],
)
def test_config_validation(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_errors_name_the_class_the_field_and_the_value():
    cases = [
        (lambda: CropConfig(local_crops_number=-1),
         "CropConfig.local_crops_number must be an integer >= 0; received -1."),
        (lambda: AugmentationConfig(grayscale_probability=True),
         "AugmentationConfig.grayscale_probability must be a probability in [0, 1]; received True."),
        (lambda: ModelConfig(drop_path_rate=1.0),
         "ModelConfig.drop_path_rate must be a number in [0, 1); received 1.0."),
        (lambda: MaskingConfig(max_aspect=0.1),
         "MaskingConfig.max_aspect must be None or a number >= min_aspect (0.3); received 0.1."),
        (lambda: SSLConfig(data=DataConfig.recipe("digits")),
         "SSLConfig: data.crops.global_crops_size must be a multiple of model.patch_size (14); received 24."),
        (lambda: DataConfig.recipe("digits").patch_grid(14),
         "DataConfig: crops.global_crops_size must be a multiple of the patch size (14); received 24."),
    ]
    for build, message in cases:
        with pytest.raises(ValueError) as caught:
            build()
        assert str(caught.value) == message


def test_rules_normalize_pairs_triples_and_sections():
    crops = CropConfig(aspect_ratio=[1, 2])
    assert crops.aspect_ratio == (1.0, 2.0)
    assert AugmentationConfig(mean=[0, 0.5, 1]).mean == (0.0, 0.5, 1.0)
    assert AugmentationConfig(blur_probabilities=[1, 0, 0.5]).blur_probabilities == (1.0, 0.0, 0.5)
    config = SSLConfig(model={"patch_size": 4}, data=DataConfig.recipe("digits").to_dict())
    assert isinstance(config.model, ModelConfig) and isinstance(config.data.crops, CropConfig)
    assert OptimConfig(warmup_epochs=10).to_dict()["warmup_epochs"] == 10  # numbers are stored as given


def test_data_and_patch_size_of_what_a_pipeline_is_given():
    digits = SSLConfig.recipe("digits")
    assert data_and_patch_size(digits) == (digits.data, 4)
    assert data_and_patch_size(digits, 8) == (digits.data, 8)  # an explicit patch size wins
    assert data_and_patch_size(None) == (DataConfig(), 14)
    assert data_and_patch_size(digits.data) == (digits.data, 14)
    with pytest.raises(ValueError, match="config must be a DataConfig"):
        data_and_patch_size("digits")
    with pytest.raises(ValueError, match="patch_size must be an integer >= 1; received 0"):
        data_and_patch_size(digits.data, 0)


def test_every_config_field_has_exactly_one_rule():
    for cls in CLASSES:
        assert set(FIELD_RULES[cls.__name__]) == {f.name for f in dataclasses.fields(cls)}, cls.__name__

    @dataclasses.dataclass
    class Unruled(ConfigBase):
        size: int = 1

    with pytest.raises(TypeError, match="FIELD_RULES"):
        Unruled()


def test_config_package_imports_nothing_else_of_the_library():
    folder = pathlib.Path(config_package.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("keras_dinov2") or name.startswith("keras_dinov2.config"), (path, name)


def test_config_json_written_before_model_config_still_loads():
    """A run directory's config.json from before `SSLConfig.model`: the model settings sat in "optim" and
    "data" / "masking" (the file is what `keras-dinov2 pretrain` wrote for the digits recipe then)."""
    with open(os.path.join(FIXTURES, "digits_before_model_config.json")) as f:
        stored = json.load(f)
    old = stored["ssl"]
    assert "model" not in old and old["optim"]["drop_path_rate"] == 0.1
    assert old["data"]["masking"]["patch_size"] == 4
    before = json.dumps(old, sort_keys=True)
    config = SSLConfig.from_dict(old)
    assert json.dumps(old, sort_keys=True) == before  # the stored dict is not modified
    assert config == SSLConfig.recipe("digits")
    upgraded, today = upgrade_layout(old), SSLConfig.recipe("digits").to_dict()
    # Fields added after the file was written (DINO v1's switches) are absent and take their defaults.
    assert {name: {key: today[name][key] for key in section} if isinstance(section, dict) else today[name]
            for name, section in upgraded.items()} == upgraded
    assert upgrade_layout(config.to_dict()) == config.to_dict()
    # A dict of today's layout with a model setting left in "optim" is refused, not guessed.
    mixed = config.to_dict()
    mixed["optim"]["drop_path_rate"] = 0.2
    with pytest.raises(ValueError, match=r"OptimConfig.from_dict received unknown keys \['drop_path_rate'\]"):
        SSLConfig.from_dict(mixed)
