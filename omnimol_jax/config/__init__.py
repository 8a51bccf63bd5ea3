"""Typed configuration: dataclasses loaded from YAML with dotted `key=value` overrides, validated.

    batch.py      what data.global_batch_size means on a topology: rows per process, micro-batch and device
    sections.py   the sections of a run config (model, LoRA, MoGE, graph, data, mesh, init, train): frozen
                  dataclasses with defaults and `validate()`
    loading.py    YAML files, model presets and `key=value` overrides into those sections, with type checks
                  that name the dotted key and suggest the closest valid one

Import from here (`from omnimol_jax.config import load_config, ModelConfig`): these names are the public API.
"""
from omnimol_jax.config.batch import BatchGeometry, batch_geometry, process_batch_rows
from omnimol_jax.config.loading import (
    BASE_CONFIG,
    CONFIG_DIR,
    MODEL_PRESET_DIR,
    MOVED_KEYS,
    REPLACED_KEYS,
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
    "BASE_CONFIG", "BATCHING_MODES", "BatchGeometry", "CHAT_FORMATS", "CONFIG_DIR", "Config", "ConfigError", "DType",
    "DataConfig", "GraphConfig", "InitConfig", "LoRAConfig", "LoRATarget", "MIXTURE_MODES", "MODEL_PRESET_DIR",
    "MOVED_KEYS", "MeshConfig", "MoGEConfig", "MoGELayerSet", "ModelConfig", "OVERLONG_MODES", "REPLACED_KEYS",
    "RematPolicy", "TrainConfig", "available_model_presets", "batch_geometry", "build_dataclass", "load_config",
    "load_model_preset", "mesh_config_from_text", "model_config_from_preset", "parse_override",
    "process_batch_rows", "read_yaml", "resolve_raw", "save_config",
]
