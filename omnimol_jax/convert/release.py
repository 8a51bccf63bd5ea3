"""Released Omni-Mol checkpoints (the public PyTorch code's `checkpoint-N/` folders) in and out.

`import_release` reads config.json, adapter_config.json, adapter_model.safetensors (or .bin),
non_lora_trainables.bin (projector and routers; or a stage-1 mm_projector.bin), the frozen base Llama folder and the
MoleculeSTM graph file, checks every key and shape against the config before writing anything, and writes a full
omnimol checkpoint tensor by tensor into a temporary folder that becomes `out` only on success.

`export_release` writes the same layout back (plus molecule_model.pth, and the frozen base Llama unless `base` names
a folder holding exactly the model's frozen weights), so that the public loader (config -> base -> graph -> MoE ->
non-LoRA weights -> PeftModel -> merge) computes the model. An imported checkpoint keeps its release config files in
its metadata, so release -> ours -> release gives back the same files, keys and values.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from omnimol_jax.checkpoint import (
    ASSETS_DIR,
    atomic_directory,
    load_params,
    path_text,
    read_graph_config,
    read_metadata,
    save_params,
    write_metadata,
)
from omnimol_jax.config import GraphConfig, ModelConfig
from omnimol_jax.convert import safetensors_io as st, torch_files
from omnimol_jax.convert.hf_llama import (
    NUMPY_DTYPES,
    check_tensors,
    copy_assets,
    hf_config_from_model,
    model_config_from_hf,
    read_hf_config,
    tensor_table,
)
from omnimol_jax.convert.moleculestm import gin_params_from_moleculestm, moleculestm_key_map, read_torch_state_dict
from omnimol_jax.convert.release_layout import (
    ADAPTER,
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    CONFIG_FILE,
    MOLECULESTM_FILE,
    NON_LORA,
    NON_LORA_FILE,
    PROJECTOR_KEYS,
    STAGE1_PROJECTOR_FILE,
    ReleaseFormatError,
    ReleaseTensor,
    adapter_config,
    check_exportable,
    graph_config_from_release,
    model_config_from_release,
    release_config,
    release_tensors,
    to_ours,
    to_release,
    with_graph_width,
)
from omnimol_jax.model.build import omnimol_constructor

logger = logging.getLogger(__name__)

SOURCE_KIND = "omnimol_release"
BASE_DIR = "base"  # export-release writes the frozen Llama here unless --base names one
GAL_NAMES = ("gal_a", "gal_b", "gal_p")  # the order of the release's [3] lora_learnable_alpha.weights
# Shape fields of text_config that must agree with the base Llama folder the weights come from.
TEXT_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ReleaseFormatError(f"{path}: missing")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReleaseFormatError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ReleaseFormatError(f"{path}: expected a JSON object")
    return value


class _TensorFile:
    """A safetensors or torch state-dict file, read one tensor at a time (header / memory map)."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            try:
                self._infos = st.list_tensors(path)
            except st.SafetensorsError as err:
                raise ReleaseFormatError(str(err)) from None
            self.shapes = {k: v.shape for k, v in self._infos.items()}
            self.dtypes = {k: v.dtype for k, v in self._infos.items()}
        else:
            try:
                self._lazy = torch_files.load_lazy(path)
            except torch_files.TorchFileError as err:
                raise ReleaseFormatError(str(err)) from None
            self.shapes = {k: tuple(v.shape) for k, v in self._lazy.items()}
            self.dtypes = {k: torch_files.to_numpy(v.flatten()[:0]).dtype for k, v in self._lazy.items()}

    def load(self, name: str) -> np.ndarray:
        if hasattr(self, "_infos"):
            return st.load_tensor(self._infos[name])
        return np.array(torch_files.to_numpy(self._lazy[name]))


def _dtype_name(dtype: np.dtype) -> str:
    names = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
    return names.get(np.dtype(dtype), str(dtype))


# --------------------------------------------------------------------------------------------------
# Import


@dataclasses.dataclass
class _Plan:
    """What an import reads: configs, the tensor files and where each release tensor is found."""

    folder: Path
    base_dir: Path
    release: dict
    adapter: Optional[dict]
    config: ModelConfig
    graph: GraphConfig
    table: list[ReleaseTensor]
    found: dict[str, _TensorFile]  # release tensor name -> its file
    names: dict[str, str]          # release tensor name -> the key in that file (a stage-1 file keeps its own)
    base_tensors: dict[str, st.TensorInfo]
    gin: dict
    ignored: list[str]
    release_dtype: str


def _check_text_config(base: dict, text: dict, base_dir: Path, source: Path) -> None:
    different = [f"{k}: {text[k]} in {source.name} vs {base.get(k)} in {base_dir / 'config.json'}"
                 for k in TEXT_SHAPE_FIELDS if k in text and base.get(k) is not None and text[k] != base[k]]
    if different:
        raise ReleaseFormatError(f"{source}: text_config does not match the base Llama: " + "; ".join(different))


def _adapter_file(folder: Path) -> Path:
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ReleaseFormatError(f"{folder}: {ADAPTER_CONFIG_FILE} is there but no adapter weights "
                             f"({' or '.join(ADAPTER_FILES)})")


def _plan_import(folder: Path, base: Optional[str], moleculestm: Optional[str], projector: Optional[str],
                 dtype: Optional[str]) -> _Plan:
    if not folder.is_dir():
        raise ReleaseFormatError(f"{folder}: not a directory")
    release = _read_json(folder / CONFIG_FILE)
    source = folder / CONFIG_FILE
    if release.get("model_type") != "llava":
        raise ReleaseFormatError(f"{source}: model_type {release.get('model_type')!r} is not a released Omni-Mol "
                                 "config ('llava', a GraphLlavaConfig)")
    if release.get("language_backbone_name", "llama") != "llama":
        raise ReleaseFormatError(f"{source}: language_backbone_name {release.get('language_backbone_name')!r} is "
                                 "not supported (only 'llama')")
    text = release.get("text_config") or {}
    base_dir = Path(base or text.get("_name_or_path") or "")
    if not (base or text.get("_name_or_path")) or not (base_dir / "config.json").is_file():
        raise ReleaseFormatError(f"{source}: the base Llama folder {str(base_dir)!r} (text_config._name_or_path) is "
                                 "not a local HF folder; pass --base <folder with config.json and safetensors>")
    base_hf = read_hf_config(base_dir)
    _check_text_config(base_hf, text, base_dir, source)
    base_config = model_config_from_hf(base_hf, source=str(base_dir / "config.json"), dtype=dtype)
    adapter = _read_json(folder / ADAPTER_CONFIG_FILE) if (folder / ADAPTER_CONFIG_FILE).is_file() else None
    config = model_config_from_release(base_config, release, adapter, str(source), str(folder / ADAPTER_CONFIG_FILE))
    graph = graph_config_from_release(release, str(source))
    if moleculestm is None:
        raise ReleaseFormatError(f"{folder}: a release checkpoint never holds the graph tower; pass --moleculestm "
                                 "<MoleculeSTM molecule_model.pth>")
    gin = gin_params_from_moleculestm(read_torch_state_dict(moleculestm), graph, source=str(moleculestm))

    files: list[_TensorFile] = []
    if adapter is not None:
        files.append(_TensorFile(_adapter_file(folder)))
        if not (folder / NON_LORA_FILE).is_file():
            raise ReleaseFormatError(f"{folder}: {NON_LORA_FILE} (projector and routers) is missing")
        files.append(_TensorFile(folder / NON_LORA_FILE))
    stage1 = Path(projector) if projector else folder / STAGE1_PROJECTOR_FILE
    if projector and not stage1.is_file():
        raise ReleaseFormatError(f"{stage1}: no such projector file")
    if adapter is None and not stage1.is_file():
        raise ReleaseFormatError(f"{folder}: neither a stage-2 checkpoint ({ADAPTER_CONFIG_FILE}, "
                                 f"{ADAPTER_FILES[0]}, {NON_LORA_FILE}) nor a stage-1 one ({STAGE1_PROJECTOR_FILE})")

    table = with_graph_width(release_tensors(config), graph)
    found: dict[str, _TensorFile] = {}
    names: dict[str, str] = {}
    for file in files:
        for name in file.shapes:
            found[name], names[name] = file, name
    if stage1.is_file() and (projector or not all(k in found for k in PROJECTOR_KEYS.values())):
        stage1_file = _TensorFile(stage1)
        for part, release_name in PROJECTOR_KEYS.items():
            # The public loader keeps what follows "mm_projector." in each key.
            keys = [k for k in stage1_file.shapes if k.split("mm_projector.", 1)[-1] == f"weight.{part}"
                    and "mm_projector." in k]
            if len(keys) != 1:
                raise ReleaseFormatError(f"{stage1}: expected one '...mm_projector.weight.{part}' key, found "
                                         f"{keys or sorted(stage1_file.shapes)}")
            found[release_name], names[release_name] = stage1_file, keys[0]
    ignored = []
    if adapter is not None and adapter.get("use_learnable_alpha") and not config.lora.gal:
        ignored = [n for n in found if n.endswith(".lora_learnable_alpha.weights")]
        logger.warning("%s: lora_alpha / r == 1, so the public code skips GAL: ignoring %d lora_learnable_alpha "
                       "tensors", folder / ADAPTER_CONFIG_FILE, len(ignored))
    _check_release_tensors(config, table, found, names, ignored, folder)
    try:
        base_tensors = st.list_checkpoint_tensors(base_dir)
    except st.SafetensorsError as err:
        raise ReleaseFormatError(str(err)) from None
    check_tensors(base_config, base_tensors, base_dir)
    adapter_dtypes = {_dtype_name(found[t.name].dtypes[names[t.name]]) for t in table if t.file == ADAPTER}
    release_dtype = sorted(adapter_dtypes)[0] if len(adapter_dtypes) == 1 else "float32"
    if config.lora.enabled and config.lora.gal and config.lora.alpha != 16:
        logger.warning("%s: lora_alpha=%s, but the public evaluation merges GAL adapters with a clamped to 15.9..16.1 "
                       "(as this import does); training clamped a to lora_alpha +- 0.1", folder, config.lora.alpha)
    return _Plan(folder, base_dir, release, adapter, config, graph, table, found, names, base_tensors, gin, ignored,
                 release_dtype)


def _check_release_tensors(config: ModelConfig, table: list[ReleaseTensor], found: dict[str, _TensorFile],
                           names: dict[str, str], ignored: list[str], folder: Path) -> None:
    rank = config.lora.rank
    for tensor in table:  # the adapter's own rank first: a clearer message than a list of shape mismatches
        if tensor.kind == "lora_a" and tensor.name in found:
            file_rank = found[tensor.name].shapes[names[tensor.name]][0]
            if file_rank != rank:
                raise ReleaseFormatError(f"{found[tensor.name].path}: LoRA rank {file_rank} ({tensor.name}) disagrees "
                                         f"with r={rank} in {folder / ADAPTER_CONFIG_FILE}")
            break
    expected = {t.name: t for t in table}
    missing = [n for n in expected if n not in found]
    wrong = [f"{n}: {list(found[n].shapes[names[n]])}, expected {list(t.shape)}" for n, t in expected.items()
             if n in found and tuple(found[n].shapes[names[n]]) != t.shape]
    unexpected = [f"{n} ({found[n].path.name})" for n in found if n not in expected and n not in ignored
                  and names[n] == n]
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {'; '.join(wrong[:12])}")
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected[:12])}"
                        f"{' ...' if len(unexpected) > 12 else ''}")
    if problems:
        raise ReleaseFormatError(f"{folder}: the weights do not match {CONFIG_FILE} and {ADAPTER_CONFIG_FILE}: "
                                 + " | ".join(problems))


def import_release(checkpoint: str | Path, out: str | Path, *, base: Optional[str] = None,
                   moleculestm: Optional[str] = None, projector: Optional[str] = None, dtype: Optional[str] = None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """A released Omni-Mol checkpoint folder -> a full omnimol checkpoint at `out` (see the module docstring)."""
    folder, out = Path(checkpoint), Path(out)
    plan = _plan_import(folder, base, moleculestm, projector, dtype)
    abstract = nnx.eval_shape(omnimol_constructor(plan.config, plan.graph))
    expected = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract))}
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")

    params: dict[tuple[str, ...], object] = {}
    partial: dict[tuple[str, ...], np.ndarray] = {}  # stacked expert adapters, filled one expert at a time

    def put(path: tuple[str, ...], value: np.ndarray, expert: Optional[int] = None) -> None:
        want = expected[path]
        if expert is None:
            params[path] = jax.numpy.asarray(np.asarray(value).astype(want.dtype, copy=False).reshape(want.shape))
        else:
            partial.setdefault(path, np.zeros(want.shape, want.dtype))[expert] = value

    total = len(plan.base_tensors) + len(plan.table) + len(plan.gin)
    with atomic_directory(out, overwrite=overwrite) as tmp, \
            tqdm(total=total, desc="import-release", unit="tensor", disable=not progress) as bar:
        for mapping in tensor_table(plan.config):
            tensor = st.load_tensor(plan.base_tensors[mapping.hf_name])
            put(("language_model",) + mapping.path, mapping.from_hf(tensor))
            bar.update()
        for tensor in plan.table:
            value = to_ours(tensor, plan.found[tensor.name].load(plan.names[tensor.name]).astype(np.float32))
            if tensor.kind == "gal":
                for j, name in enumerate(GAL_NAMES):
                    put(tensor.path + (name,), value[j], tensor.expert)
            else:
                put(tensor.path, value, tensor.expert)
            bar.update()
        for path, value in partial.items():
            params[path] = jax.numpy.asarray(value)
        partial.clear()
        for path, value in plan.gin.items():
            put(("graph_tower",) + tuple(map(str, path)), value)
            bar.update()
        if set(params) != set(expected):  # the table and the model disagree: a bug, not bad input
            raise RuntimeError(f"import-release built {sorted(map(path_text, set(expected) - set(params)))[:8]} "
                               f"missing / {sorted(map(path_text, set(params) - set(expected)))[:8]} extra")
        save_params(tmp, params)
        params.clear()
        write_metadata(tmp, plan.config, {"graph": dataclasses.asdict(plan.graph), "source": {
            "kind": SOURCE_KIND, "path": str(folder.resolve()), "base": str(plan.base_dir.resolve()),
            "moleculestm": str(Path(moleculestm).resolve()), "release_dtype": plan.release_dtype,
            "release_config": plan.release, "adapter_config": plan.adapter}})
        if not copy_assets(folder, tmp / ASSETS_DIR):
            copy_assets(plan.base_dir, tmp / ASSETS_DIR)
    return out


# --------------------------------------------------------------------------------------------------
# Export


def _verify_base(config: ModelConfig, params, base_dir: Path, progress: bool) -> None:
    """Refuses a --base folder whose weights are not exactly the model's frozen ones (the adapters would then be
    applied to other weights)."""
    hf = model_config_from_hf(read_hf_config(base_dir), source=str(base_dir / "config.json"))
    try:
        found = st.list_checkpoint_tensors(base_dir)
    except st.SafetensorsError as err:
        raise ReleaseFormatError(str(err)) from None
    check_tensors(hf, found, base_dir)
    different = []
    for mapping in tqdm(tensor_table(config), desc="verify --base", unit="tensor", disable=not progress):
        ours = np.asarray(params[("language_model",) + mapping.path])
        theirs = mapping.from_hf(st.load_tensor(found[mapping.hf_name])).astype(ours.dtype)
        if not np.array_equal(theirs, ours):
            different.append(mapping.hf_name)
    if different:
        raise ReleaseFormatError(f"{base_dir}: {len(different)} tensors differ from the checkpoint's frozen weights "
                                 f"({', '.join(different[:6])}); leave out --base to write them beside the release")


def export_release(checkpoint: str | Path, out: str | Path, *, base: Optional[str] = None, dtype: Optional[str] = None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """A full omnimol checkpoint -> the public code's checkpoint layout at `out` (see the module docstring)."""
    checkpoint, out = Path(checkpoint), Path(out)
    config, meta = read_metadata(checkpoint)
    graph = read_graph_config(meta)
    check_exportable(config, graph)
    source = meta.get("source") or {}
    recorded = source if source.get("kind") == SOURCE_KIND else {}
    dtype = dtype or recorded.get("release_dtype") or "float32"
    if dtype not in NUMPY_DTYPES:
        raise ReleaseFormatError(f"--dtype {dtype!r} is not supported; use one of {list(NUMPY_DTYPES)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    params = load_params(checkpoint)
    table = with_graph_width(release_tensors(config), graph)
    lm_table = tensor_table(config)
    gin_map = moleculestm_key_map(graph)

    used = {("language_model",) + m.path for m in lm_table}
    used |= {("graph_tower",) + tuple(map(str, path)) for path, _ in gin_map.values()}
    for tensor in table:
        used |= {tensor.path + (n,) for n in GAL_NAMES} if tensor.kind == "gal" else {tensor.path}
    dropped = sorted(path_text(p) for p in set(params) - used)
    if dropped:
        raise ReleaseFormatError(f"{checkpoint}: the release layout cannot carry {len(dropped)} weights "
                                 f"({', '.join(dropped[:8])}); export them with `omnimol export-hf`")

    if base is not None:
        _verify_base(config, params, Path(base), progress)
    same_base = (bool(recorded) and base is not None
                 and Path(base).resolve() == Path(recorded.get("base", "")).resolve())
    target = NUMPY_DTYPES[dtype]

    def release_value(tensor: ReleaseTensor) -> np.ndarray:
        if tensor.kind == "gal":
            values = [np.asarray(params[tensor.path + (n,)], np.float32) for n in GAL_NAMES]
            return np.stack([v if tensor.expert is None else v[tensor.expert] for v in values])
        value = np.asarray(params[tensor.path], np.float32)
        return to_release(tensor, value if tensor.expert is None else value[tensor.expert])

    with atomic_directory(out, overwrite=overwrite) as tmp:
        if base is None:
            base_path = str((out / BASE_DIR).resolve())
            (tmp / BASE_DIR).mkdir()
            base_hf = hf_config_from_model(config, dtype=config.param_dtype)
            (tmp / BASE_DIR / "config.json").write_text(json.dumps(base_hf, indent=2) + "\n")
            base_dtype = np.dtype(NUMPY_DTYPES[config.param_dtype])

            def frozen(mapping):
                return np.ascontiguousarray(mapping.to_hf(np.asarray(params[("language_model",) + mapping.path])))
            st.write_checkpoint(tmp / BASE_DIR, [st.PlannedTensor(m.hf_name, base_dtype, m.hf_shape,
                                                                  lambda m=m: frozen(m).astype(base_dtype))
                                                 for m in lm_table], st.parse_size("5GB"))
            copy_assets(checkpoint / ASSETS_DIR, tmp / BASE_DIR)
        else:
            base_path = str(Path(base).resolve())
            base_hf = read_hf_config(Path(base))
        if recorded.get("release_config"):  # an imported release: its own config files, paths updated if moved
            release = copy.deepcopy(recorded["release_config"])
            adapter = copy.deepcopy(recorded.get("adapter_config"))
            if not same_base:
                release.setdefault("text_config", {})["_name_or_path"] = base_path
                if adapter is not None:
                    adapter["base_model_name_or_path"] = base_path
        else:
            text_config = {k: v for k, v in base_hf.items() if k != "rope_parameters"}
            release = release_config(config, graph, base_path, text_config)
            adapter = adapter_config(config, base_path) if config.lora.enabled else None
        (tmp / CONFIG_FILE).write_text(json.dumps(release, indent=2) + "\n")
        adapter_tensors = [t for t in table if t.file == ADAPTER]
        with tqdm(total=len(table), desc="export-release", unit="tensor", disable=not progress) as bar:
            if adapter is not None:
                (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter, indent=2) + "\n")
                st.write_file(tmp / ADAPTER_FILES[0], [
                    st.PlannedTensor(t.name, np.dtype(target), t.shape,
                                     lambda t=t: release_value(t).astype(target)) for t in adapter_tensors],
                    metadata={"format": "pt"}, on_tensor=lambda _: bar.update())
            non_lora = {t.name: release_value(t).astype(target) for t in table if t.file == NON_LORA}
            if adapter is not None:
                torch_files.write_state_dict(tmp / NON_LORA_FILE, non_lora)
            else:  # a stage-1 model: the projector alone, as the stage-1 trainer saves it
                torch_files.write_state_dict(tmp / "mm_projector.bin", non_lora)
            bar.update(len(non_lora))
        graph_state = {}
        for name, (path, transpose) in gin_map.items():
            value = np.asarray(params[("graph_tower",) + tuple(map(str, path))], np.float32)
            value = value.reshape(1) if name.endswith(".eps") else value.T if transpose else value
            graph_state[f"molecule_node_model.{name}"] = value
        for layer in range(graph.num_layers):  # torch BatchNorm1d state that inference does not use
            for norm in (f"gnns.{layer}.mlp.1", f"batch_norms.{layer}"):
                graph_state[f"molecule_node_model.{norm}.num_batches_tracked"] = np.zeros((), np.int64)
        torch_files.write_state_dict(tmp / MOLECULESTM_FILE, graph_state)
        copy_assets(checkpoint / ASSETS_DIR, tmp)
    return out
