"""Config loading: every shipped YAML loads, overrides are typed, mistakes name the key."""
from pathlib import Path

import pytest

from omnimol_jax.config import (
    BASE_CONFIG,
    CONFIG_DIR,
    ConfigError,
    ModelConfig,
    available_model_presets,
    load_config,
    model_config_from_preset,
)
from omnimol_jax.model.llama import count_parameters

RUN_CONFIGS = sorted([*Path(CONFIG_DIR).glob("*.yaml"), *(Path(__file__).parents[2] / "configs").glob("*.yaml")])


def test_presets_exist():
    assert {"tiny", "small", "llama3_2_1b", "llama3_2_3b", "llama3_1_8b"} <= set(available_model_presets())


@pytest.mark.parametrize("preset", available_model_presets())
def test_every_model_preset_loads(preset):
    config = model_config_from_preset(preset)
    assert isinstance(config, ModelConfig) and config.preset == preset


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_loads(path):
    config = load_config(path)
    assert config.model.num_layers > 0


def test_overrides_are_typed_and_win_over_preset():
    config = load_config(BASE_CONFIG,
                         ["model.preset=small", "model.num_layers=4", "model.rope_theta=1e4", "mesh.fsdp=2",
                          "model.tie_word_embeddings=false"])
    assert config.model.hidden_size == 640  # from the small preset
    assert config.model.num_layers == 4 and isinstance(config.model.num_layers, int)
    assert config.model.rope_theta == 10000.0  # '1e4' is a string to YAML 1.1; coerced to float
    assert config.mesh.fsdp == 2 and config.model.tie_word_embeddings is False


@pytest.mark.parametrize("override, message", [
    ("model.num_layer=4", "model.num_layer: unknown key; did you mean 'num_layers'?"),
    ("modle.num_layers=4", "modle: unknown key; did you mean 'model'?"),
    ("model.num_layers=four", "model.num_layers: expected an integer, got 'four'"),
    ("model.dtype=bf16",
     "model.dtype: 'bf16' is not one of ['float32', 'bfloat16', 'float16']; did you mean 'bfloat16'?"),
    ("model.tie_word_embeddings=2", "model.tie_word_embeddings: expected true/false, got 2"),
    ("model.preset=tiyn", "model.preset: unknown preset 'tiyn'; did you mean 'tiny'?"),
    ("mesh.data=0", "mesh.data: must be -1 or >= 1, got 0"),
    ("model.num_kv_heads=3", "model.num_heads: num_heads=4 must be a multiple of num_kv_heads=3"),
    ("model.num_layers", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(BASE_CONFIG, [override])
    assert message in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: tiny\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match="model.hiden_size: unknown key; did you mean 'hidden_size'"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("preset, expected", [
    ("llama3_2_1b", 1_235_814_400),   # meta-llama/Llama-3.2-1B
    ("llama3_2_3b", 3_212_749_824),   # meta-llama/Llama-3.2-3B
    ("llama3_1_8b", 8_030_261_248),   # meta-llama/Llama-3.1-8B
])
def test_preset_parameter_counts_match_published_models(preset, expected):
    assert count_parameters(model_config_from_preset(preset)) == expected


def test_small_preset_is_in_the_benchmark_range():
    assert 50e6 <= count_parameters(model_config_from_preset("small")) <= 100e6


def test_moge_layers_by_name_or_by_explicit_list():
    """Named sets, or the public code's explicit `moe_layers_idx` (its moe_mode `sparse` is layers 0, 4, 8, ...)."""
    named = load_config(BASE_CONFIG, ["model.num_layers=12", "model.moge.enabled=true", "model.lora.enabled=true",
                                      "model.moge.layers=every_4th"])
    assert named.model.moge.layer_indices(12) == (3, 7, 11)
    listed = load_config(BASE_CONFIG, ["model.num_layers=12", "model.moge.enabled=true", "model.lora.enabled=true",
                                       "model.moge.layer_list=[8, 0, 4]"])
    assert listed.model.moge.layer_indices(12) == (0, 4, 8)
    with pytest.raises(ConfigError, match=r"model.moge.layer_list: \[12\] are not layers of a 12-layer model"):
        load_config(BASE_CONFIG, ["model.num_layers=12", "model.moge.enabled=true", "model.lora.enabled=true",
                                  "model.moge.layer_list=[0, 12]"])
