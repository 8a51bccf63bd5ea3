"""Model checkpoints: an Orbax parameter tree plus the model config, written atomically.

Layout of a checkpoint directory:
    omnimol_checkpoint.json   format version, model config, provenance
    params/                   Orbax (StandardCheckpointer) tree of parameter arrays, string keys
    hf_assets/                tokenizer and generation files carried through from a HF folder (optional)

The parameter tree mirrors the module tree: {'layers': {'0': {'self_attn': {'q_proj': {'kernel': ...}}}}}.
Training-run checkpoints (optimizer, data iterator, ...) are managed by the trainer; this is the format
that conversion, evaluation and generation read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from omnimol_jax.config import ConfigError, GraphConfig, ModelConfig, build_dataclass
from omnimol_jax.errors import InputError
from omnimol_jax.model.build import llama_constructor, omnimol_constructor

FORMAT_VERSION = 1
META_FILE = "omnimol_checkpoint.json"
PARAMS_DIR = "params"
ASSETS_DIR = "hf_assets"
# Files copied through unchanged between a HF folder and a checkpoint's hf_assets/ (tokenizer, chat template,
# generation settings); omnimol_tokenizer.json describes a tokenizer that build-data trained.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "generation_config.json", "chat_template.jinja", "chat_template.json", "omnimol_tokenizer.json")

# The one flat-key convention: a variable's key is its nnx path as a tuple of strings, ("layers", "0", "mlp", ...);
# `path_text` is that key written out ("layers/0/mlp/..."), for messages, regular expressions (train.unfreeze) and
# pytrees that need string keys (the train state in run checkpoints).
FlatParams = dict[tuple[str, ...], Any]


def path_key(path: tuple) -> tuple[str, ...]:
    return tuple(map(str, path))


def path_text(path: tuple) -> str:
    return "/".join(map(str, path))


class CheckpointError(InputError):
    """A checkpoint directory is missing, incomplete or does not match the model; names the path."""


def flatten(tree: dict) -> FlatParams:
    out: FlatParams = {}

    def visit(node, prefix):
        if isinstance(node, dict):
            for key, child in node.items():
                visit(child, prefix + (str(key),))
        else:
            out[prefix] = node

    visit(tree, ())
    return out


def unflatten(flat: FlatParams) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def flat_variables(state: nnx.State) -> dict[tuple[str, ...], nnx.Variable]:
    """The variables of an nnx State keyed by string paths (checkpoint layout)."""
    return {path_key(path): variable for path, variable in nnx.to_flat_state(state)}


def flat_values(state: nnx.State) -> FlatParams:
    """The arrays of an nnx State keyed by string paths (checkpoint layout)."""
    return {key: variable.get_value() for key, variable in flat_variables(state).items()}


def module_params(module: nnx.Module) -> FlatParams:
    """The module's parameters keyed by string paths (checkpoint layout)."""
    return flat_values(nnx.state(module, nnx.Param))


def module_state(module: nnx.Module) -> FlatParams:
    """Every variable of the module (parameters and statistics such as batch-norm running means)."""
    return flat_values(nnx.state(module, nnx.Variable))


def assign_params(module: nnx.Module, params: FlatParams, strict: bool = True, kind: Any = nnx.Param) -> int:
    """Writes `params` into the module's `kind` variables, each cast to the variable's dtype and placed with
    its sharding; returns how many were written. Shapes must match; with `strict` so must the key sets."""
    variables = flat_variables(nnx.state(module, kind))
    missing = [path_text(k) for k in variables if k not in params]
    unexpected = [path_text(k) for k in params if k not in variables]
    mismatched, written = [], 0
    for key, value in params.items():
        variable = variables.get(key)
        if variable is None:
            continue
        current = variable.get_value()
        if tuple(value.shape) != tuple(current.shape):
            mismatched.append(f"{path_text(key)}: checkpoint {tuple(value.shape)} vs model {tuple(current.shape)}")
            continue
        variable.set_value(jax.device_put(np.asarray(value, dtype=current.dtype), current.sharding))
        written += 1
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError("parameters do not match the model:"
                              + (f"\n  missing: {missing[:20]}" if missing else "")
                              + (f"\n  unexpected: {unexpected[:20]}" if unexpected else "")
                              + (f"\n  wrong shape: {mismatched[:20]}" if mismatched else ""))
    return written


def _sync_processes(name: str) -> None:
    """A barrier across JAX processes (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_primary_process() -> bool:
    return jax.process_index() == 0


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling directory that becomes `target` only if the block succeeds.

    With several JAX processes every process must enter (the Orbax writes inside are collective): the
    temporary name is then one all processes agree on, process 0 creates and renames it, and barriers keep
    the others in step (in one process the barriers are no-ops and the name is unique).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass --overwrite to replace it)")
    primary = is_primary_process()
    if jax.process_count() > 1:
        tmp = target.parent / f".{target.name}.partial"
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        # mkdir (not mkdtemp, which makes 0700) so the checkpoint gets the user's umask like every other output
        tmp = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    _sync_processes(f"omnimol:atomic_directory:start:{target}")
    try:
        yield tmp
        _sync_processes(f"omnimol:atomic_directory:written:{target}")
        if primary:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        _sync_processes(f"omnimol:atomic_directory:done:{target}")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_metadata(directory: Path, model_config: ModelConfig, extra: Optional[dict] = None) -> None:
    if not is_primary_process():
        return
    meta = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(model_config), **(extra or {})}
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(directory: str | os.PathLike) -> tuple[ModelConfig, dict]:
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: not an omnimol checkpoint ({META_FILE} is missing)")
    try:
        meta = json.loads(meta_path.read_text())
        model_config = build_dataclass(ModelConfig, meta["model"], prefix="model")
    except (json.JSONDecodeError, KeyError, ConfigError) as err:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata: {err}") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory}: the {PARAMS_DIR}/ directory is missing")
    return model_config, meta


def save_params(directory: Path, params: FlatParams) -> None:
    """Saves a flat parameter dict with Orbax (synchronously), holding about one tensor beyond `params`.

    Orbax copies every array to host before writing; with jax.Array leaves, a device->host budget of one
    tensor and no compression (whose buffers are another full copy), that copy is one tensor at a time.
    Pass jax.Arrays: numpy leaves are converted here, which costs a copy of each while `params` lives.
    """
    arrays = {k: v if isinstance(v, jax.Array) else jax.numpy.asarray(v) for k, v in params.items()}
    budget_bytes = max([1 << 20] + [v.nbytes for v in arrays.values()])
    handler = ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=budget_bytes / 1e9, use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(Path(directory).absolute() / PARAMS_DIR, args=ocp.args.PyTreeSave(unflatten(arrays)))


def save_model_checkpoint(directory: str | os.PathLike, model_config: ModelConfig, params: FlatParams,
                          extra_metadata: Optional[dict] = None, overwrite: bool = False) -> Path:
    with atomic_directory(Path(directory), overwrite=overwrite) as tmp:
        save_params(tmp, params)
        write_metadata(tmp, model_config, extra_metadata)
    return Path(directory)


def params_metadata(directory: str | os.PathLike) -> FlatParams:
    """Shapes and dtypes of the stored parameters (nothing is read)."""
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(Path(directory).absolute() / PARAMS_DIR)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return flatten(jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(tree)))


def load_params(directory: str | os.PathLike, shardings: Optional[FlatParams] = None) -> FlatParams:
    """Reads all parameters: host numpy arrays, or device arrays laid out by `shardings` (path -> Sharding)."""
    directory = Path(directory).absolute()
    stored = params_metadata(directory)
    if shardings is None:
        target = {k: np.empty(v.shape, v.dtype) for k, v in stored.items()}
    else:
        missing = [k for k in stored if k not in shardings]
        if missing:
            raise CheckpointError(f"{directory}: no sharding for stored parameters {missing[:10]}")
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in stored.items()}
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(directory / PARAMS_DIR, unflatten(target))
    return flatten(restored)


def read_graph_config(meta: dict):
    """The GraphConfig of a full Omni-Mol checkpoint, or None for a plain language-model checkpoint."""
    if meta.get("graph") is None:
        return None
    try:
        return build_dataclass(GraphConfig, meta["graph"], prefix="graph")
    except ConfigError as err:
        raise CheckpointError(f"unreadable graph config in checkpoint metadata: {err}") from err


def copy_assets(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer and generation files of a HF or tokenizer folder (ASSET_FILES, nothing else: the folder may
    hold the model's weights too); returns the names copied."""
    copied = []
    for name in ASSET_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_omnimol_checkpoint(directory: str | os.PathLike, model_config: ModelConfig, graph_config,
                            model: nnx.Module, extra_metadata: Optional[dict] = None, overwrite: bool = False,
                            assets_from: Optional[Path] = None) -> Path:
    """A full Omni-Mol model (graph tower, projector, language model with adapters) as a model checkpoint."""
    params = module_state(model)
    with atomic_directory(Path(directory), overwrite=overwrite) as tmp:
        save_params(tmp, params)
        write_metadata(tmp, model_config, {"graph": dataclasses.asdict(graph_config), **(extra_metadata or {})})
        if assets_from is not None and Path(assets_from).is_dir() and is_primary_process():
            copy_assets(Path(assets_from), tmp / ASSETS_DIR)
    return Path(directory)


def load_omnimol(directory: str | os.PathLike, mesh: Optional[jax.sharding.Mesh] = None):
    """(OmniMolModel with the checkpoint's weights, metadata dict); sharded over `mesh` when given."""
    model_config, meta = read_metadata(directory)
    graph_config = read_graph_config(meta)
    if graph_config is None:
        raise CheckpointError(f"{directory} holds a language model only (as `omnimol init` and `omnimol import-hf` "
                              "write), without the graph tower and projector that generate and eval need: use a "
                              "trained model (<train.output_dir>/final), or `omnimol init --full` for a random one")
    return _load_module(directory, omnimol_constructor(model_config, graph_config), mesh), meta


def load_llama(directory: str | os.PathLike, mesh: Optional[jax.sharding.Mesh] = None):
    """A LlamaForCausalLM with the checkpoint's weights, sharded over `mesh` when given."""
    model_config, _ = read_metadata(directory)
    return _load_module(directory, llama_constructor(model_config), mesh)


def _load_module(directory: str | os.PathLike, constructor, mesh: Optional[jax.sharding.Mesh]):
    from omnimol_jax.sharding import state_shardings

    abstract = nnx.eval_shape(constructor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        sharded = state_shardings(abstract_state, mesh)
        shardings = flat_values(sharded)
    params = load_params(directory, shardings)
    flat_state = nnx.to_flat_state(abstract_state)
    expected = {tuple(map(str, p)) for p, _ in flat_state}
    if set(params) != expected:
        raise CheckpointError(f"{directory}: parameters do not match the model config; missing "
                              f"{sorted('/'.join(k) for k in expected - set(params))[:10]}, unexpected "
                              f"{sorted('/'.join(k) for k in set(params) - expected)[:10]}")
    for path, variable in flat_state:
        value = params[tuple(map(str, path))]
        variable.set_value(value if isinstance(value, jax.Array) else jax.numpy.asarray(value))
    return nnx.merge(graphdef, abstract_state)


def save_random_checkpoint(config, out: str | os.PathLike, *, full: bool = False, overwrite: bool = False) -> None:
    """A randomly initialised model of a run config (`omnimol init`), initialised directly in the shards of its
    mesh: the language model alone, or with `full` the whole Omni-Mol model (graph tower and projector too)."""
    from omnimol_jax.sharding import build_mesh, create_sharded_model

    mesh = build_mesh(config.mesh)
    source = {"source": {"kind": "random_init", "seed": config.seed}}
    if full:
        model = create_sharded_model(omnimol_constructor(config.model, config.graph, seed=config.seed), mesh)
        save_omnimol_checkpoint(out, config.model, config.graph, model, overwrite=overwrite, extra_metadata=source)
    else:
        model = create_sharded_model(llama_constructor(config.model, seed=config.seed), mesh)
        save_model_checkpoint(out, config.model, module_params(model), overwrite=overwrite, extra_metadata=source)
