"""Typed configuration: dataclasses loaded from YAML with dotted `key=value` overrides, validated.

    sections.py   the sections of a run config (model, LoRA, MoGE, graph, data, mesh, init, train): frozen
                  dataclasses with defaults and `validate()`
    loading.py    YAML files, model presets and `key=value` overrides into those sections, with type checks
                  that name the dotted key and suggest the closest valid one

Import from here (`from omnimol_jax.config import load_config, ModelConfig`): these names are the public API.
"""
from omnimol_jax.config.loading import (
    BASE_CONFIG,
    CONFIG_DIR,
    MODEL_PRESET_DIR,
    MOVED_KEYS,
    available_model_presets,
    build_dataclass,
    load_config,
    load_model_preset,
    mesh_config_from_text,
    model_config_from_preset,
    parse_override,
    read_yaml,
    resolve_raw,
    save_config,
)
from omnimol_jax.config.sections import (
    BATCHING_MODES,
    CHAT_FORMATS,
    MIXTURE_MODES,
    OVERLONG_MODES,
    Config,
    ConfigError,
    DataConfig,
    DType,
    GraphConfig,
    InitConfig,
    LoRAConfig,
    LoRATarget,
    MeshConfig,
    ModelConfig,
    MoGEConfig,
    MoGELayerSet,
    RematPolicy,
    TrainConfig,
)

__all__ = [
    "BASE_CONFIG", "BATCHING_MODES", "CHAT_FORMATS", "CONFIG_DIR", "Config", "ConfigError", "DType", "DataConfig",
    "GraphConfig", "InitConfig", "LoRAConfig", "LoRATarget", "MIXTURE_MODES", "MODEL_PRESET_DIR", "MOVED_KEYS",
    "MeshConfig", "MoGEConfig", "MoGELayerSet", "ModelConfig", "OVERLONG_MODES", "RematPolicy", "TrainConfig",
    "available_model_presets", "build_dataclass", "load_config", "load_model_preset", "mesh_config_from_text",
    "model_config_from_preset", "parse_override", "read_yaml", "resolve_raw", "save_config",
]
