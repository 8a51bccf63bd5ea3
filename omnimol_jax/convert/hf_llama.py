"""Hugging Face Llama <-> omnimol checkpoint conversion: the tensor table, configs and import (export, in every
format, is convert/hf_export.py).

One table (`tensor_table`) states, for every parameter, its HF name and shape and the two layout maps
(our kernels are [in, ..., out, ...]; HF linear weights are [out, in]). Import and export both walk it
tensor by tensor, so peak host memory is the output plus one tensor in flight. Both validate everything
they can before writing, and write into a temporary directory that replaces the target only on success.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from omnimol_jax.checkpoint import (
    ASSETS_DIR,
    FlatParams,
    atomic_directory,
    copy_assets,
    flat_variables,
    save_params,
    write_metadata,
)
from omnimol_jax.config import ConfigError, ModelConfig
from omnimol_jax.convert import safetensors_io as st
from omnimol_jax.errors import InputError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Tensors a HF folder may carry that the model does not use.
IGNORED_HF_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


class HFConversionError(InputError):
    """The HF folder or checkpoint cannot be converted; the message says which file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    path: tuple[str, ...]          # our parameter path (checkpoint layout)
    hf_name: str
    hf_shape: tuple[int, ...]
    ours_shape: tuple[int, ...]
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def tensor_table(config: ModelConfig) -> list[TensorMapping]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim

    def in_heads(heads):  # ours [d, heads, hd] <-> HF [heads*hd, d]
        return (lambda x: x.reshape(d, heads * hd).T, lambda w: w.T.reshape(d, heads, hd))

    def linear():  # ours [in, out] <-> HF [out, in]
        return (lambda x: x.T, lambda w: w.T)

    table = [TensorMapping(("embed_tokens", "embedding"), "model.embed_tokens.weight", (v, d), (v, d),
                           _identity, _identity)]
    for i in range(config.num_layers):
        ours, hf = ("layers", str(i)), f"model.layers.{i}"
        for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            table.append(TensorMapping(ours + ("self_attn", name, "kernel"), f"{hf}.self_attn.{name}.weight",
                                       (heads * hd, d), (d, heads, hd), *in_heads(heads)))
        table.append(TensorMapping(ours + ("self_attn", "o_proj", "kernel"), f"{hf}.self_attn.o_proj.weight",
                                   (d, h * hd), (h, hd, d),
                                   lambda x: x.reshape(h * hd, d).T, lambda w: w.T.reshape(h, hd, d)))
        for name, in_dim, out_dim in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
            table.append(TensorMapping(ours + ("mlp", name, "kernel"), f"{hf}.mlp.{name}.weight",
                                       (out_dim, in_dim), (in_dim, out_dim), *linear()))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table.append(TensorMapping(ours + (norm, "scale"), f"{hf}.{norm}.weight", (d,), (d,),
                                       _identity, _identity))
    table.append(TensorMapping(("norm", "scale"), "model.norm.weight", (d,), (d,), _identity, _identity))
    if not config.tie_word_embeddings:
        table.append(TensorMapping(("lm_head", "kernel"), "lm_head.weight", (v, d), (d, v), *linear()))
    return table


# --------------------------------------------------------------------------------------------------
# Configs


def _rope_settings(hf: dict, source: str) -> dict:
    """Reads RoPE settings from either transformers-5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        rope = dict(params)
    else:
        rope = dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise HFConversionError(f"{source}: unsupported rope type {rope_type!r}; supported: "
                                f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    out = {"rope_type": rope_type, "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        try:
            out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        except KeyError as err:
            raise HFConversionError(f"{source}: llama3 rope scaling lacks {err}") from err
    return out


def model_config_from_hf(hf: dict, source: str = "config.json", dtype: Optional[str] = None) -> ModelConfig:
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise HFConversionError(f"{source}: unsupported architecture {architectures or hf.get('model_type')!r} "
                                f"(model_type {hf.get('model_type')!r}); supported: {SUPPORTED_ARCHITECTURES}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HFConversionError(f"{source}: {flag}=true is not supported (Llama uses bias-free projections)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = dtype or hf_dtype
    if dtype not in NUMPY_DTYPES:
        raise HFConversionError(f"{source}: dtype {dtype!r} is not supported; use one of {list(NUMPY_DTYPES)}")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        config = ModelConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            param_dtype=dtype, dtype=dtype,
            bos_token_id=_first_id(hf.get("bos_token_id")), eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")),
            **_rope_settings(hf, source))
        config.validate()
    except KeyError as err:
        raise HFConversionError(f"{source}: required field {err} is missing") from err
    except (TypeError, ValueError, ConfigError) as err:
        if isinstance(err, HFConversionError):
            raise
        raise HFConversionError(f"{source}: invalid value: {err}") from err
    return config


def _first_id(value) -> Optional[int]:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def hf_config_from_model(config: ModelConfig, dtype: Optional[str] = None) -> dict:
    rope: dict = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type in ("linear", "llama3"):
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_position_embeddings)
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range, "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "use_cache": True, "dtype": dtype or config.param_dtype,
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling.
        "rope_parameters": rope, "rope_theta": config.rope_theta,
        "rope_scaling": (None if config.rope_type == "default"
                         else {k: v for k, v in rope.items() if k != "rope_theta"}),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key) is not None:
            hf[key] = getattr(config, key)
    return hf


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFConversionError(f"{hf_dir}: not a directory")
    if not path.is_file():
        raise HFConversionError(f"{hf_dir}: config.json is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConversionError(f"{path}: invalid JSON: {err}") from err


# --------------------------------------------------------------------------------------------------
# In-memory conversion (tests, parity checks, small models)


def params_to_hf_state_dict(config: ModelConfig, params: FlatParams) -> dict[str, np.ndarray]:
    return {m.hf_name: np.ascontiguousarray(m.to_hf(np.asarray(params[m.path]))) for m in tensor_table(config)}


# --------------------------------------------------------------------------------------------------
# Import


def check_tensors(config: ModelConfig, found: dict[str, st.TensorInfo], source: Path) -> None:
    table = tensor_table(config)
    expected = {m.hf_name: m for m in table}
    missing = [name for name in expected if name not in found]
    wrong_shape = [f"{name}: {found[name].shape}, expected {m.hf_shape}"
                   for name, m in expected.items() if name in found and found[name].shape != m.hf_shape]
    unexpected = [name for name in found if name not in expected
                  and not name.endswith(IGNORED_HF_TENSOR_SUFFIXES)
                  and not (name == "lm_head.weight" and config.tie_word_embeddings)]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}")
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): {'; '.join(wrong_shape[:20])}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if problems:
        raise HFConversionError(f"{source}: the weights do not match config.json:\n  " + "\n  ".join(problems))
    if "lm_head.weight" in found and config.tie_word_embeddings:
        logger.warning("%s: ignoring lm_head.weight because tie_word_embeddings=true", source)


def import_hf(hf_dir: str | Path, out: str | Path, dtype: Optional[str] = None, overwrite: bool = False,
              progress: bool = True) -> Path:
    """HF Llama folder (config.json + safetensors, single or sharded) -> omnimol checkpoint at `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    hf_config = read_hf_config(hf_dir)
    config = model_config_from_hf(hf_config, source=str(hf_dir / "config.json"), dtype=dtype)
    try:
        found = st.list_checkpoint_tensors(hf_dir)
    except st.SafetensorsError as err:
        raise HFConversionError(str(err)) from err
    check_tensors(config, found, hf_dir)
    target_dtype = NUMPY_DTYPES[config.param_dtype]

    table = tensor_table(config)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        params: FlatParams = {}
        for mapping in tqdm(table, desc="import-hf", unit="tensor", disable=not progress):
            tensor = st.load_tensor(found[mapping.hf_name])
            # A jax.Array now, so the Orbax save needs no second full copy (see checkpoint.save_params).
            params[mapping.path] = jax.numpy.asarray(mapping.from_hf(tensor).astype(target_dtype, copy=False))
            del tensor
        save_params(tmp, params)
        del params
        write_metadata(tmp, config, {"source": {"kind": "huggingface", "path": str(hf_dir.resolve()),
                                                "architectures": hf_config.get("architectures")}})
        copy_assets(hf_dir, tmp / ASSETS_DIR)
    return out


# What must agree between a configured model and pretrained weights for the weights to mean the same thing.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                       "head_dim", "tie_word_embeddings", "rope_type", "rope_theta", "rope_factor")


def check_same_architecture(ours: ModelConfig, theirs: ModelConfig, source) -> None:
    """HFConversionError listing every architecture field in which `source`'s model differs from the configured one."""
    different = [f"model.{f} is {getattr(ours, f)} in the config, {getattr(theirs, f)} there"
                 for f in ARCHITECTURE_FIELDS if getattr(ours, f) != getattr(theirs, f)]
    if different:
        raise HFConversionError(f"{source} does not fit the configured model: " + "; ".join(different))


def load_hf_weights(language_model, hf_dir: str | Path, progress: bool = True) -> ModelConfig:
    """Loads a HF Llama folder's weights into an existing (possibly sharded) LlamaForCausalLM, tensor by tensor.

    The folder's architecture must equal the model's (shape fields compared by name); adapters and other
    non-HF parameters are left as they are. Returns the folder's ModelConfig.
    """
    hf_dir = Path(hf_dir)
    hf_config = model_config_from_hf(read_hf_config(hf_dir), source=str(hf_dir / "config.json"))
    ours = language_model.config
    check_same_architecture(ours, hf_config, hf_dir)
    try:
        found = st.list_checkpoint_tensors(hf_dir)
    except st.SafetensorsError as err:
        raise HFConversionError(str(err)) from err
    check_tensors(hf_config, found, hf_dir)
    from flax import nnx

    variables = flat_variables(nnx.state(language_model, nnx.Param))
    for mapping in tqdm(tensor_table(ours), desc="load-hf", unit="tensor", disable=not progress):
        variable = variables[mapping.path]
        current = variable.get_value()
        value = mapping.from_hf(st.load_tensor(found[mapping.hf_name])).astype(current.dtype, copy=False)
        variable.set_value(jax.device_put(np.ascontiguousarray(value), current.sharding))
    return hf_config
