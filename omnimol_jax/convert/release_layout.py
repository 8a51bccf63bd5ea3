"""The checkpoint layout of the public Omni-Mol code (docs/omnimol.md §7): file names, the tensor table, and the
translation between its GraphLlavaConfig / PEFT LoraConfig and our configs.

One table (`release_tensors`) states every tensor a release checkpoint holds beside the frozen base Llama: its
file, name and torch shape, and which of our parameters it is (an adapter's A, B or GAL scalars, one expert of a
stacked adapter, a router, the projector). Import and export both walk it.

Layout facts the table encodes:
- LoRA keys are `base_model.model.language_model.model.layers.{i}.<module>.<proj>.lora_{A,B}.weight` with A [r, in]
  and B [out, r] (torch Linear); MoE layers have `mlp.experts.{e}.<proj>` and `mlp.shared_experts.<proj>` and no
  adapter on the frozen MLP they replaced.
- `<proj>.lora_learnable_alpha.weights` is ONE [3] tensor holding GAL's (a, b, p) in that order.
- `non_lora_trainables.bin` holds `base_model.model.mm_projector.weight.{weight,bias}` (the projector module keeps its
  Linear in an attribute named `weight`) and the routers `...layers.{j}.mlp.moe_gate.weight` [E, d].
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import numpy as np

from omnimol_jax.config import ConfigError, GraphConfig, LoRAConfig, ModelConfig, MoGEConfig
from omnimol_jax.errors import InputError

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"
STAGE1_PROJECTOR_FILE = "mm_projector.bin"
MOLECULESTM_FILE = "molecule_model.pth"  # written by export-release beside the checkpoint (never in a public one)
ADAPTER, NON_LORA = "adapter", "non_lora"

PREFIX = "base_model.model."
LAYERS = PREFIX + "language_model.model.layers"
PROJECTOR_KEYS = {"weight": PREFIX + "mm_projector.weight.weight", "bias": PREFIX + "mm_projector.weight.bias"}

# The public loader's moe_mode names (modeling_llava._get_moe_layers_by_mode); moe_layers_idx overrides the mode.
MOE_MODES = {
    "first_half": lambda n: list(range(n // 2)),
    "second_half": lambda n: list(range(n // 2, n)),
    "sparse": lambda n: list(range(n))[::4],
    "dense": lambda n: list(range(n)),
    "second_quarter": lambda n: list(range(n - n // 4, n)),
}
# The boxes the public code clamps GAL's (a, b, p) to when it merges an adapter for evaluation (get_delta_weight):
# a in 15.9..16.1 whatever lora_alpha is, b in +-0.05, p in 0.5 +- 0.01.
RELEASE_GAL_RANGES = {"gal_a_range": (15.9, 16.1), "gal_b_range": (-0.05, 0.05), "gal_p_range": (0.49, 0.51)}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class ReleaseFormatError(InputError):
    """A release folder (or an export to one) does not fit the layout; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class ReleaseTensor:
    name: str                        # key in its file
    file: str                        # ADAPTER or NON_LORA
    shape: tuple[int, ...]           # torch layout
    kind: str                        # lora_a | lora_b | gal | router | projector_weight | projector_bias
    path: tuple[str, ...]            # our parameter (lora_a/b: the adapter's a/b; gal: the adapter)
    expert: Optional[int] = None     # the slot of a stacked (per-expert) adapter
    in_shape: tuple[int, ...] = ()   # our kernel's input dims (lora_a)
    out_shape: tuple[int, ...] = ()  # our kernel's output dims (lora_b)


def _projection_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    d, f = config.hidden_size, config.intermediate_size
    h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    return {"q_proj": ((d,), (h, hd)), "k_proj": ((d,), (kv, hd)), "v_proj": ((d,), (kv, hd)),
            "o_proj": ((h, hd), (d,)), "gate_proj": ((d,), (f,)), "up_proj": ((d,), (f,)), "down_proj": ((f,), (d,))}


def _adapter_tensors(release: str, ours: tuple[str, ...], in_shape, out_shape, rank: int, gal: bool,
                     expert: Optional[int] = None) -> list[ReleaseTensor]:
    fan_in, fan_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    out = [ReleaseTensor(f"{release}.lora_A.weight", ADAPTER, (rank, fan_in), "lora_a", ours + ("a",), expert,
                         in_shape=in_shape),
           ReleaseTensor(f"{release}.lora_B.weight", ADAPTER, (fan_out, rank), "lora_b", ours + ("b",), expert,
                         out_shape=out_shape)]
    if gal:
        out.append(ReleaseTensor(f"{release}.lora_learnable_alpha.weights", ADAPTER, (3,), "gal", ours, expert))
    return out


def release_tensors(config: ModelConfig, projector: bool = True) -> list[ReleaseTensor]:
    """Every tensor of the release files (adapter + non-LoRA) for `config`, in a fixed order."""
    lora, moge = config.lora, config.moge
    shapes = _projection_shapes(config)
    moe_layers = set(moge.layer_indices(config.num_layers))
    table: list[ReleaseTensor] = []
    for i in range(config.num_layers):
        release, ours = f"{LAYERS}.{i}", ("language_model", "layers", str(i))
        for proj in ATTENTION + MLP:
            group = "self_attn" if proj in ATTENTION else "mlp"
            if not lora.enabled or proj not in lora.targets or (group == "mlp" and i in moe_layers):
                continue
            table += _adapter_tensors(f"{release}.{group}.{proj}", ours + (group, f"{proj}_lora"), *shapes[proj],
                                      lora.rank, lora.gal)
        if i not in moe_layers:
            continue
        mlp = ours + ("mlp",)
        for e in range(moge.num_experts):
            for proj in MLP:
                kind = proj.split("_")[0]
                table += _adapter_tensors(f"{release}.mlp.experts.{e}.{proj}", mlp + (f"expert_{kind}_lora",),
                                          *shapes[proj], lora.rank, lora.gal, expert=e)
        if moge.num_shared_experts:
            for proj in MLP:
                kind = proj.split("_")[0]
                table += _adapter_tensors(f"{release}.mlp.shared_experts.{proj}", mlp + (f"shared_{kind}_lora",),
                                          *shapes[proj], lora.rank, lora.gal)
        table.append(ReleaseTensor(f"{release}.mlp.moe_gate.weight", NON_LORA, (moge.num_experts, config.hidden_size),
                                   "router", mlp + ("router",)))
    if projector:
        table.append(ReleaseTensor(PROJECTOR_KEYS["weight"], NON_LORA, (config.hidden_size, 0), "projector_weight",
                                   ("projector", "linear_in", "kernel")))
        table.append(ReleaseTensor(PROJECTOR_KEYS["bias"], NON_LORA, (config.hidden_size,), "projector_bias",
                                   ("projector", "linear_in", "bias")))
    return table


def with_graph_width(table: list[ReleaseTensor], graph: GraphConfig) -> list[ReleaseTensor]:
    """Fills the projector's input width (the graph tower's), which the language-model config does not know."""
    return [dataclasses.replace(t, shape=(t.shape[0], graph.hidden_size)) if t.kind == "projector_weight" else t
            for t in table]


# --------------------------------------------------------------------------------------------------
# Tensor layouts: release (torch) <-> ours


def to_ours(tensor: ReleaseTensor, value: np.ndarray) -> np.ndarray:
    """The release tensor in our layout (for gal: the [3] vector (a, b, p) as is)."""
    if tensor.kind == "lora_a":  # [r, in] -> in_shape + [r]
        return value.T.reshape(tensor.in_shape + (value.shape[0],))
    if tensor.kind == "lora_b":  # [out, r] -> [r] + out_shape
        return value.T.reshape((value.shape[1],) + tensor.out_shape)
    if tensor.kind == "projector_weight":
        return value.T
    return value


def to_release(tensor: ReleaseTensor, value: np.ndarray) -> np.ndarray:
    """Our parameter (one expert's slice already taken) in the release layout."""
    if tensor.kind == "lora_a":
        rank = value.shape[-1]
        return value.reshape(-1, rank).T
    if tensor.kind == "lora_b":
        rank = value.shape[0]
        return value.reshape(rank, -1).T
    if tensor.kind == "projector_weight":
        return value.T
    return value


# --------------------------------------------------------------------------------------------------
# Configs


def _moe_layers(moe: dict, num_layers: int, source: str) -> list[int]:
    if moe.get("moe_layers_idx") is not None:
        layers = [int(i) for i in moe["moe_layers_idx"]]
    else:
        mode = moe.get("moe_mode")
        if mode not in MOE_MODES:
            raise ReleaseFormatError(f"{source}: moe_config.moe_mode {mode!r} is not a mode of the public code "
                                     f"({', '.join(MOE_MODES)}) and moe_layers_idx is not set")
        layers = MOE_MODES[mode](num_layers)
    outside = [i for i in layers if not 0 <= i < num_layers]
    if not layers or outside:
        raise ReleaseFormatError(f"{source}: moe layers {layers} do not fit a {num_layers}-layer model")
    return layers


def _moge_config(release: dict, num_layers: int, source: str) -> MoGEConfig:
    moe = release.get("moe_config") or {}
    if not moe:
        raise ReleaseFormatError(f"{source}: moe_enable is true but moe_config is missing")
    if moe.get("moe_class", "deepseek") != "deepseek":
        raise ReleaseFormatError(f"{source}: moe_config.moe_class {moe.get('moe_class')!r} is not supported "
                                 "(only the default 'deepseek' MoE blocks)")
    layers = _moe_layers(moe, num_layers, source)
    experts = moe.get("num_experts")
    counts = experts if isinstance(experts, list) else [experts] * len(layers)
    if len(counts) != len(layers) or any(not isinstance(c, int) or c < 1 for c in counts):
        raise ReleaseFormatError(f"{source}: moe_config.num_experts {experts!r} must give one positive count per "
                                 f"MoE layer ({len(layers)})")
    if len(set(counts)) != 1:
        raise ReleaseFormatError(f"{source}: moe_config.num_experts {counts} differs between layers; every MoE "
                                 "layer must have the same number of experts")
    top_k = moe.get("top_k_experts")
    if not isinstance(top_k, int):
        raise ReleaseFormatError(f"{source}: moe_config.top_k_experts is {top_k!r}, expected an integer")
    return MoGEConfig(enabled=True, layer_list=tuple(layers), num_experts=counts[0], top_k=top_k,
                      num_shared_experts=1 if moe.get("use_residual") else 0,
                      norm_topk_prob=bool(release.get("norm_topk_prob")),
                      aux_loss_coef=float(moe.get("router_aux_loss_coef") or 0.01))


def _lora_config(adapter: dict, source: str, moge: bool) -> LoRAConfig:
    for flag in ("use_dora", "use_rslora"):
        if adapter.get(flag):
            raise ReleaseFormatError(f"{source}: {flag}=true is not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if adapter.get(pattern):
            raise ReleaseFormatError(f"{source}: {pattern} (per-module ranks) is not supported")
    if adapter.get("bias", "none") != "none":
        raise ReleaseFormatError(f"{source}: bias={adapter.get('bias')!r} is not supported (only 'none')")
    targets = adapter.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ReleaseFormatError(f"{source}: target_modules must list projection names, got {targets!r}")
    unknown = sorted(set(targets) - set(ATTENTION + MLP))
    if unknown:
        raise ReleaseFormatError(f"{source}: target_modules {unknown} are not Llama projections "
                                 f"({', '.join(ATTENTION + MLP)})")
    if moge and not set(MLP) <= set(targets):
        raise ReleaseFormatError(f"{source}: target_modules {sorted(targets)} leave some expert projections without "
                                 "LoRA; MoGE experts need gate_proj, up_proj and down_proj")
    try:
        rank, alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    except (KeyError, TypeError, ValueError) as err:
        raise ReleaseFormatError(f"{source}: r and lora_alpha must be numbers ({err})") from None
    # The public layer tests plain scaling first: with alpha / r == 1 GAL is skipped entirely.
    gal = bool(adapter.get("use_learnable_alpha")) and alpha / rank != 1
    ordered = tuple(t for t in ATTENTION + MLP if t in targets)
    return LoRAConfig(enabled=True, rank=rank, alpha=alpha, dropout=float(adapter.get("lora_dropout") or 0.0),
                      targets=ordered, gal=gal, gal_a_init=alpha, **RELEASE_GAL_RANGES)


def graph_config_from_release(release: dict, source: str) -> GraphConfig:
    graph = release.get("graph_config") or {}
    if graph.get("encoder_gnn_type", "gin") != "gin" or graph.get("encoder_JK", "last") != "last":
        raise ReleaseFormatError(f"{source}: graph_config {graph.get('encoder_gnn_type')!r}/JK "
                                 f"{graph.get('encoder_JK')!r} is not supported (only the GIN with JK 'last')")
    if release.get("projector_type", "naive_linear") != "naive_linear":
        raise ReleaseFormatError(f"{source}: projector_type {release.get('projector_type')!r} is not supported "
                                 "(only 'naive_linear')")
    return GraphConfig(feature_mode="omnimol", num_layers=int(graph.get("encoder_num_layer") or 5),
                       hidden_size=int(graph.get("hidden_size") or 300), projector_type="linear")


def model_config_from_release(base: ModelConfig, release: dict, adapter: Optional[dict], source: str,
                              adapter_source: str) -> ModelConfig:
    """Our ModelConfig: the base Llama's shape, the adapter's LoRA and the release's MoE settings."""
    moe_enabled = bool(release.get("moe_enable") or (release.get("text_config") or {}).get("moe_enable"))
    if adapter is None:
        if moe_enabled:
            raise ReleaseFormatError(f"{source}: moe_enable is true but the folder has no {ADAPTER_CONFIG_FILE}")
        return base
    lora = _lora_config(adapter, adapter_source, moe_enabled)
    moge = _moge_config(release, base.num_layers, source) if moe_enabled else MoGEConfig()
    try:
        config = dataclasses.replace(base, lora=lora, moge=moge)
        config.validate()
    except ConfigError as err:
        raise ReleaseFormatError(f"{source}: {err}") from None
    return config


def check_exportable(config: ModelConfig, graph: Optional[GraphConfig]) -> None:
    """Refuses a model the public code cannot compute (a weight or setting the release layout cannot carry)."""
    problems = []
    if graph is None:
        problems.append("it is a language model only; a release checkpoint is a full Omni-Mol model (train one, or "
                        "import-release one)")
    elif graph.projector_type != "linear":
        problems.append(f"graph.projector_type={graph.projector_type} (the release has only the linear projector)")
    elif graph.feature_mode != "omnimol":
        problems.append(f"graph.feature_mode={graph.feature_mode} (released models read 2 atom + 2 bond features)")
    lora, moge = config.lora, config.moge
    if moge.enabled and not lora.enabled:
        problems.append("MoGE without model.lora.enabled (the release puts LoRA on every target projection)")
    if moge.enabled and not set(MLP) <= set(lora.targets):
        problems.append("MoGE experts carry LoRA on gate/up/down, so model.lora.targets must include all three")
    if moge.expert_ranks and len(set(moge.expert_ranks)) > 1:
        problems.append(f"per-expert ranks {list(moge.expert_ranks)} (the public code gives every expert one rank)")
    if moge.enabled and moge.routed_scaling_factor != 1.0:
        problems.append(f"model.moge.routed_scaling_factor={moge.routed_scaling_factor} (the public code uses 1)")
    if lora.enabled and lora.gal:
        if lora.alpha == lora.rank:
            problems.append("GAL with lora.alpha == lora.rank (the public code then skips GAL and scales by 1)")
        different = {k: getattr(lora, k) for k, v in RELEASE_GAL_RANGES.items() if tuple(getattr(lora, k)) != v}
        if different:
            problems.append(f"GAL boxes {different} (the public merge clamps to {RELEASE_GAL_RANGES})")
    if problems:
        raise ReleaseFormatError("the release layout cannot carry this model: " + "; ".join(problems))


def release_config(config: ModelConfig, graph: GraphConfig, base_path: str, text_config: dict) -> dict:
    """A GraphLlavaConfig (config.json) the public loader reads, for a model trained here."""
    moge = config.moge
    layers = list(moge.layer_indices(config.num_layers))
    text = dict(text_config, _name_or_path=base_path, moe_enable=moge.enabled)
    out: dict[str, Any] = {
        "architectures": ["GraphLlavaForConditionalGeneration"], "model_type": "llava",
        "language_backbone_name": "llama", "projector_type": "naive_linear", "moe_enable": moge.enabled,
        "ignore_index": -100, "image_token_index": -200, "norm_topk_prob": True if moge.norm_topk_prob else None,
        "graph_config": {"model_type": "graph", "model_name": "moleculestm", "encoder_num_layer": graph.num_layers,
                         "hidden_size": graph.hidden_size, "encoder_JK": "last", "encoder_drop_ratio": 0.1,
                         "encoder_gnn_type": "gin"},
        "projector_config": {"model_type": "projector", "projector_type": "linear"},
        "text_config": text,
    }
    if moge.enabled:
        out["moe_config"] = {
            "model_type": "moe_module", "moe_class": "deepseek", "moe_mode": _mode_of(layers, config.num_layers),
            "moe_layers_idx": layers, "num_experts": [moge.num_experts] * len(layers),
            "top_k_experts": moge.top_k, "use_residual": bool(moge.num_shared_experts),
            "router_aux_loss_coef": moge.aux_loss_coef, "norm_topk_prob": moge.norm_topk_prob,
        }
    return out


def _mode_of(layers: list[int], num_layers: int) -> str:
    for mode, select in MOE_MODES.items():
        if select(num_layers) == layers:
            return mode
    return "dense"  # moe_layers_idx, written beside it, overrides the mode


def adapter_overrides(config: ModelConfig) -> list[str]:
    """`key=value` overrides that give a run config this model's LoRA and MoGE settings (for train init.checkpoint)."""
    out = []
    for section, value, default in (("lora", config.lora, LoRAConfig()), ("moge", config.moge, MoGEConfig())):
        for field in dataclasses.fields(value):
            mine, theirs = getattr(value, field.name), getattr(default, field.name)
            if mine != theirs:
                shown = list(mine) if isinstance(mine, tuple) else mine
                text = json.dumps(shown).replace(" ", "") if isinstance(shown, (list, bool)) else shown
                out.append(f"model.{section}.{field.name}={text}")
    return out


def adapter_config(config: ModelConfig, base_path: str) -> dict:
    lora = config.lora
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": list(lora.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "use_learnable_alpha": lora.gal}
