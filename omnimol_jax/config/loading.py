"""Reading a run config: YAML files and dotted `key=value` overrides into the typed sections (sections.py).

One run config (e.g. `configs/demo.yaml`) names a model preset (`model.preset: tiny`); the preset file
`omnimol_jax/configs/models/<preset>.yaml` (package data, so a wheel carries it) supplies the model shape, and
keys given explicitly in the run config or on the command line win over it. Every key is checked against the
dataclasses: an unknown key or a value of the wrong type fails before anything is built, with the closest valid
key suggested.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from omnimol_jax.config.sections import Config, ConfigError, MeshConfig, ModelConfig, _require, _suggest

# Package data: the default run config (base.yaml) and the model presets (models/<preset>.yaml).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
MODEL_PRESET_DIR = CONFIG_DIR / "models"


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against annotation `tp`; converts only where lossless (int -> float, '1e-4' -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{_suggest(str(value), map(str, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section '{key}', got {type(value).__name__}")
        return build_dataclass(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items  # tuples keep frozen configs hashable
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-4' (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


# Keys that moved, so an old config gets told where its key went.
MOVED_KEYS = {"data.feature_mode": "graph.feature_mode"}
# Keys whose meaning changed: what to write instead.
REPLACED_KEYS = {
    "data.batch_size": "it counted rows per process; write data.global_batch_size, the rows of one optimizer step "
                       "over all processes (old batch_size x processes x train.grad_accum_steps)",
}


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Builds `cls` from a dict, rejecting unknown keys (with a suggestion) and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if dotted in MOVED_KEYS:
            raise ConfigError(f"{dotted}: this key moved to {MOVED_KEYS[dotted]}")
        if dotted in REPLACED_KEYS:
            raise ConfigError(f"{dotted}: no longer a key: {REPLACED_KEYS[dotted]}")
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key{_suggest(str(key), names)} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Loading.


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.num_layers=4` -> (['model', 'num_layers'], 4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. model.num_layers=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value: {err}") from err
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[:depth + 1])}: is a value, not a section ({origin})")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def available_model_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))


def load_model_preset(name: str) -> dict[str, Any]:
    path = MODEL_PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = available_model_presets()
        raise ConfigError(f"model.preset: unknown preset {name!r}{_suggest(name, presets)} (available: {presets})")
    return read_yaml(path)


def resolve_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """Fills the model section from its preset; explicit keys win over the preset's."""
    raw = dict(raw)
    model = raw.get("model")
    if model is None:
        return raw
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {type(model).__name__}")
    preset = model.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"model.preset: expected a preset name, got {preset!r}")
        merged = load_model_preset(preset)
        merged.update(model)
        raw["model"] = merged
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a YAML run config, applies `key=value` overrides, resolves the model preset, validates."""
    raw = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(raw, keys, value, origin=f"override {text!r}")
    config = build_dataclass(Config, resolve_raw(raw))
    config.validate()
    return config


def model_config_from_preset(name: str, **overrides: Any) -> ModelConfig:
    """Convenience for code and tests: a validated ModelConfig from the preset `<name>`."""
    values = load_model_preset(name)
    values.update(overrides, preset=name)
    model = build_dataclass(ModelConfig, values, prefix="model")
    model.validate()
    return model


def mesh_config_from_text(text: str) -> MeshConfig:
    """'data=2,tensor=4' -> MeshConfig (the `mesh` section's key=value overrides; unnamed axes are 1 and `data`
    takes the remaining devices unless sized)."""
    sizes = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}
    for part in text.split(","):
        keys, value = parse_override(part.strip())
        _require(len(keys) == 1 and keys[0] in sizes and isinstance(value, int) and not isinstance(value, bool),
                 "mesh", f"{part.strip()!r} is not AXIS=SIZE with AXIS in {', '.join(sizes)}")
        sizes[keys[0]] = value
    config = build_dataclass(MeshConfig, sizes, prefix="mesh")
    config.validate()
    return config


def save_config(config: Any, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
