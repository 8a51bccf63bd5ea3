"""omnimol checkpoint -> stock Hugging Face folders, in the format that carries every weight.

Formats (`export_hf(..., format=)`):
    llama      LlamaForCausalLM; LoRA adapters are merged into their frozen kernels (W + s B A, GAL scale s).
    peft       LlamaForCausalLM with the frozen weights, plus `adapter/` that stock `peft.PeftModel.from_pretrained`
               loads: PEFT's key names and layout, `lora_alpha = r` (PEFT scale 1) and each GAL scale s folded
               into its B, so the adapter computes the same function.
    qwen2-moe  Qwen2MoeForCausalLM for MoGE models, loaded with no custom code: dense layers (`mlp_only_layers`)
               get their LoRA merged; each routed expert is the frozen FFN with its own LoRA merged; the router
               becomes `mlp.gate`; the shared expert is merged, with a zero `shared_expert_gate` and its down
               projection doubled (the gate computes sigmoid(0) = 0.5). No q/k/v biases; RoPE and tied embeddings
               as in the source.
    auto       qwen2-moe for MoGE models, else llama.
A full Omni-Mol checkpoint also gets `graph_encoder.safetensors` (the GIN in MoleculeSTM's torch naming and the
projector as a torch Linear) with `graph_encoder.json` (its GraphConfig and feature mode).

Never drop a weight: every stored parameter must land in some written tensor, or the export is refused before
anything is written, naming those parameters and the format that can carry them. The stored parameters are read
once to host memory and each output tensor is produced (merged in fp32) only when its turn comes to be written,
into a temporary folder that replaces `out` only on success.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from omnimol_jax.checkpoint import (
    ASSETS_DIR,
    FlatParams,
    atomic_directory,
    load_params,
    path_text,
    read_graph_config,
    read_metadata,
)
from omnimol_jax.config import ModelConfig
from omnimol_jax.constants import GRAPH_ENCODER_CONFIG, GRAPH_ENCODER_FILE
from omnimol_jax.convert import safetensors_io as st
from omnimol_jax.convert.hf_llama import (
    NUMPY_DTYPES,
    HFConversionError,
    TensorMapping,
    copy_assets,
    hf_config_from_model,
    tensor_table,
)
from omnimol_jax.model.lora import lora_scale

FORMATS = ("auto", "llama", "peft", "qwen2-moe")
ADAPTER_DIR = "adapter"
Path_ = tuple[str, ...]


@dataclasses.dataclass
class _Planned:
    """One tensor to write: its name, shape, a producer called while writing, and the stored parameters it uses."""

    name: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]
    uses: tuple[Path_, ...]
    file: str = "model"  # model | adapter | graph


def _f32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


class _Exporter:
    """Plans the tensors of one export from the stored parameters (host arrays, read once; nothing else is held
    but the tensor in flight)."""

    def __init__(self, config: ModelConfig, params: FlatParams, lm_prefix: Path_):
        self.config, self.params, self.prefix = config, params, lm_prefix
        self.table = {m.path: m for m in tensor_table(config)}
        self.moe_layers = set(config.moge.layer_indices(config.num_layers))

    def stored(self, path: Path_) -> Path_:
        return self.prefix + path

    def value(self, path: Path_) -> np.ndarray:
        return _f32(self.params[self.stored(path)])

    # -- adapters

    def adapter_paths(self, adapter: Path_) -> tuple[Path_, ...]:
        names = ("a", "b") + (("gal_a", "gal_b", "gal_p") if self.config.lora.gal else ())
        return tuple(self.stored(adapter + (n,)) for n in names)

    def has_adapter(self, adapter: Path_) -> bool:
        return self.stored(adapter + ("a",)) in self.params

    def scale(self, adapter: Path_, rank) -> np.ndarray:
        """s of an adapter (an [E] vector for a stacked one), by the model's own formula."""
        gal = [self.value(adapter + (n,)) for n in ("gal_a", "gal_b", "gal_p")] if self.config.lora.gal else []
        return _f32(lora_scale(self.config.lora, rank, *gal, xp=np))

    def plain_delta(self, adapter: Path_) -> np.ndarray:
        """s B A of a plain adapter in kernel layout (in_shape + out_shape), fp32."""
        a, b = self.value(adapter + ("a",)), self.value(adapter + ("b",))
        return np.tensordot(a, b, axes=1) * self.scale(adapter, np.float32(a.shape[-1]))

    def expert_ranks(self) -> np.ndarray:
        moge = self.config.moge
        ranks = moge.expert_ranks or (self.config.lora.rank,) * moge.num_experts
        return np.asarray(ranks, np.float32)

    def expert_delta(self, adapter: Path_, expert: int) -> np.ndarray:
        """s_e B_e A_e of one expert of a stacked adapter (only its own rank columns), fp32, kernel layout."""
        ranks = self.expert_ranks()
        rank = int(ranks[expert])
        a, b = self.value(adapter + ("a",))[expert], self.value(adapter + ("b",))[expert]
        return np.tensordot(a[..., :rank], b[:rank], axes=1) * self.scale(adapter, ranks)[expert]

    # -- tensors

    def base_tensor(self, mapping: TensorMapping, merge: bool) -> _Planned:
        """A base-table tensor; with `merge`, its LoRA (if any) folded in."""
        adapter = mapping.path[:-2] + (f"{mapping.path[-2]}_lora",) if mapping.path[-1] == "kernel" else None
        merged = merge and adapter is not None and self.has_adapter(adapter)

        def produce():
            value = self.value(mapping.path)
            if merged:
                value = value + self.plain_delta(adapter)
            return mapping.to_hf(value)

        uses = (self.stored(mapping.path),) + (self.adapter_paths(adapter) if merged else ())
        return _Planned(mapping.hf_name, mapping.hf_shape, produce, uses)

    def llama_tensors(self, merge: bool) -> list[_Planned]:
        return [self.base_tensor(m, merge) for m in self.table.values()]

    def peft_tensors(self) -> list[_Planned]:
        """PEFT adapter tensors: lora_A [r, in], lora_B [out, r] with the GAL scale folded into B."""
        planned = []
        rank = self.config.lora.rank
        for mapping in self.table.values():
            adapter = mapping.path[:-2] + (f"{mapping.path[-2]}_lora",)
            if mapping.path[-1] != "kernel" or not self.has_adapter(adapter):
                continue
            name = mapping.hf_name[: -len(".weight")]

            def lora_a(adapter=adapter):
                return self.value(adapter + ("a",)).reshape(-1, rank).T

            def lora_b(adapter=adapter):
                scale = self.scale(adapter, np.float32(rank))
                return (self.value(adapter + ("b",)) * scale).reshape(rank, -1).T

            out_dim, in_dim = mapping.hf_shape
            planned.append(_Planned(f"base_model.model.{name}.lora_A.weight", (rank, in_dim), lora_a,
                                    self.adapter_paths(adapter), "adapter"))
            planned.append(_Planned(f"base_model.model.{name}.lora_B.weight", (out_dim, rank), lora_b, (),
                                    "adapter"))
        return planned

    def qwen2_moe_tensors(self) -> list[_Planned]:
        cfg = self.config
        d, f, experts = cfg.hidden_size, cfg.intermediate_size, cfg.moge.num_experts
        planned = [self.base_tensor(mapping, merge=True) for path, mapping in self.table.items()
                   if not (path[0] == "layers" and int(path[1]) in self.moe_layers and path[2] == "mlp")]
        for layer in sorted(self.moe_layers):
            mlp = ("layers", str(layer), "mlp")
            hf = f"model.layers.{layer}.mlp"
            planned.append(_Planned(f"{hf}.gate.weight", (experts, d), lambda mlp=mlp: self.value(mlp + ("router",)),
                                    (self.stored(mlp + ("router",)),)))
            for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                kernel, kind = mlp + (proj, "kernel"), proj.split("_")[0]
                routed = mlp + (f"expert_{kind}_lora",)
                for e in range(experts):
                    def expert_weight(kernel=kernel, routed=routed, e=e):
                        return (self.value(kernel) + self.expert_delta(routed, e)).T
                    planned.append(_Planned(f"{hf}.experts.{e}.{proj}.weight", shape, expert_weight,
                                            (self.stored(kernel),) + self.adapter_paths(routed)))
                shared = mlp + (f"shared_{kind}_lora",)
                if self.has_adapter(shared):
                    factor = np.float32(2.0 if proj == "down_proj" else 1.0)  # the gate computes sigmoid(0) = 0.5

                    def shared_weight(kernel=kernel, shared=shared, factor=factor):
                        return (self.value(kernel) + self.plain_delta(shared)).T * factor
                    planned.append(_Planned(f"{hf}.shared_expert.{proj}.weight", shape, shared_weight,
                                            self.adapter_paths(shared)))
                else:  # no shared expert: a zero one (intermediate size 1) adds exactly nothing
                    zero_shape = (1, d) if proj != "down_proj" else (d, 1)
                    planned.append(_Planned(f"{hf}.shared_expert.{proj}.weight", zero_shape,
                                            lambda zero_shape=zero_shape: np.zeros(zero_shape, np.float32), ()))
            planned.append(_Planned(f"{hf}.shared_expert_gate.weight", (1, d),
                                    lambda: np.zeros((1, d), np.float32), ()))
        return planned


def qwen2_moe_config(config: ModelConfig, dtype: str) -> dict:
    """The Qwen2MoeConfig (as config.json) that computes what the MoGE model computes."""
    moge = config.moge
    hf = hf_config_from_model(config, dtype)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        hf.pop(key, None)
    moe_layers = set(moge.layer_indices(config.num_layers))
    hf.update({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "moe_intermediate_size": config.intermediate_size,
        "shared_expert_intermediate_size": config.intermediate_size if moge.num_shared_experts else 1,
        "num_experts": moge.num_experts, "num_experts_per_tok": moge.top_k,
        "norm_topk_prob": bool(moge.norm_topk_prob), "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(config.num_layers) if i not in moe_layers],
        "qkv_bias": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers":
            config.num_layers, "output_router_logits": False, "router_aux_loss_coef": moge.aux_loss_coef,
    })
    return hf


def peft_adapter_config(config: ModelConfig, base: str) -> dict:
    lora = config.lora
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.rank,  # PEFT scale alpha / r = 1: each GAL scale is folded into B
        "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }


def _graph_tensors(params: FlatParams, graph_config) -> tuple[list[_Planned], dict]:
    """The GIN (MoleculeSTM's torch names, batch-norm statistics included) and the projector (torch Linear
    layout), for graph_encoder.safetensors; always fp32 (the frozen tower is small and precision-sensitive)."""
    from omnimol_jax.convert.moleculestm import moleculestm_key_map

    planned = []
    for name, (path, transpose) in moleculestm_key_map(graph_config).items():
        stored = ("graph_tower",) + tuple(map(str, path))
        shape = tuple(params[stored].shape)
        shape = (1,) if name.endswith(".eps") else tuple(reversed(shape)) if transpose else shape

        def produce(stored=stored, transpose=transpose, shape=shape):
            value = _f32(params[stored])
            return (value.T if transpose else value).reshape(shape)
        planned.append(_Planned(f"graph_tower.{name}", shape, produce, (stored,), "graph"))
    layers = sorted({p[1] for p in params if p[0] == "projector"})
    for layer in layers:
        kernel, bias = ("projector", layer, "kernel"), ("projector", layer, "bias")
        planned.append(_Planned(f"projector.{layer}.weight", tuple(reversed(params[kernel].shape)),
                                lambda kernel=kernel: _f32(params[kernel]).T, (kernel,), "graph"))
        planned.append(_Planned(f"projector.{layer}.bias", tuple(params[bias].shape),
                                lambda bias=bias: _f32(params[bias]), (bias,), "graph"))
    return planned, {"graph": dataclasses.asdict(graph_config), "projector_layers": layers}


def choose_format(config: ModelConfig, requested: str) -> str:
    if requested not in FORMATS:
        raise HFConversionError(f"unknown export format {requested!r}; choose one of {', '.join(FORMATS)}")
    if requested == "auto":
        return "qwen2-moe" if config.moge.enabled else "llama"
    if requested == "qwen2-moe" and not config.moge.enabled:
        raise HFConversionError("format qwen2-moe is for MoGE models; this checkpoint has none (use llama or peft)")
    if requested == "peft" and not config.lora.enabled:
        raise HFConversionError("format peft writes a LoRA adapter; this checkpoint has none (use llama)")
    return requested


def export_hf(checkpoint: str | Path, out: str | Path, *, format: str = "auto", dtype: Optional[str] = None,
              max_shard_size: str = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Writes the checkpoint as a stock HF folder in `format` (see the module docstring); returns `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    config, meta = read_metadata(checkpoint)
    fmt = choose_format(config, format)
    dtype = dtype or config.param_dtype
    if dtype not in NUMPY_DTYPES:
        raise HFConversionError(f"--dtype {dtype!r} is not supported; use one of {list(NUMPY_DTYPES)}")
    if fmt == "qwen2-moe" and config.moge.routed_scaling_factor != 1.0:
        raise HFConversionError(f"{checkpoint}: model.moge.routed_scaling_factor={config.moge.routed_scaling_factor}"
                                " has no Qwen2-MoE counterpart (it must be 1.0)")
    graph_config = read_graph_config(meta)
    params = load_params(checkpoint)
    stored = set(params)
    exporter = _Exporter(config, params, ("language_model",) if graph_config is not None else ())
    if fmt == "llama":
        planned = exporter.llama_tensors(merge=True)
    elif fmt == "peft":
        planned = exporter.llama_tensors(merge=False) + exporter.peft_tensors()
    else:
        planned = exporter.qwen2_moe_tensors()
    graph_meta = None
    if graph_config is not None:
        graph_planned, graph_meta = _graph_tensors(params, graph_config)
        planned += graph_planned
    used = {p for item in planned for p in item.uses}
    dropped = sorted(path_text(p) for p in stored - used)
    if dropped:
        carrier = "qwen2-moe" if config.moge.enabled else "peft or llama"
        raise HFConversionError(
            f"{checkpoint}: format {fmt} cannot carry {len(dropped)} weights ({', '.join(dropped[:8])}"
            f"{', ...' if len(dropped) > 8 else ''}); export with --format {carrier}")

    target_dtype = NUMPY_DTYPES[dtype]

    def planned_tensor(item: _Planned) -> st.PlannedTensor:
        dtype_out = np.dtype(np.float32) if item.file == "graph" else target_dtype
        return st.PlannedTensor(item.name, dtype_out, item.shape,
                                lambda: item.produce().astype(dtype_out, copy=False))

    by_file = {kind: [planned_tensor(p) for p in planned if p.file == kind] for kind in ("model", "adapter", "graph")}
    max_bytes = st.parse_size(max_shard_size)
    hf_config = qwen2_moe_config(config, dtype) if fmt == "qwen2-moe" else hf_config_from_model(config, dtype)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        with tqdm(total=len(planned), desc=f"export-hf ({fmt})", unit="tensor", disable=not progress) as bar:
            st.write_checkpoint(tmp, by_file["model"], max_bytes, on_tensor=lambda _: bar.update())
            if by_file["adapter"]:
                (tmp / ADAPTER_DIR).mkdir()
                (tmp / ADAPTER_DIR / "adapter_config.json").write_text(
                    json.dumps(peft_adapter_config(config, str(out.resolve())), indent=2) + "\n")
                st.write_file(tmp / ADAPTER_DIR / "adapter_model.safetensors", by_file["adapter"],
                              on_tensor=lambda _: bar.update())
            if by_file["graph"]:
                st.write_file(tmp / GRAPH_ENCODER_FILE, by_file["graph"], on_tensor=lambda _: bar.update())
                (tmp / GRAPH_ENCODER_CONFIG).write_text(json.dumps(graph_meta, indent=2) + "\n")
        copy_assets(checkpoint / ASSETS_DIR, tmp)
    return out
