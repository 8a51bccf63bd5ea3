"""The released Omni-Mol model in plain PyTorch, loaded and evaluated as the public code does, and a writer of tiny
release checkpoint folders, both built from docs/omnimol.md §§1-3 and 7 (not from our converter).

Structure (so its state-dict names are the release's names):
    language_model   transformers LlamaForCausalLM; the MLPs of the MoE layers replaced by `MoEBlock`s whose experts
                     are copies of the frozen MLP; then every target projection wrapped in `GALLoRALinear`
                     (base_layer, lora_A [r, in], lora_B [out, r], lora_learnable_alpha.weights = (a, b, p))
    mm_projector     a module whose Linear(graph width -> d) is the attribute `weight`
    gnn              the MoleculeSTM GIN (tests/gin_reference_torch.py)
Forward: per-atom GIN vectors -> projector -> written into the graph slots (IMAGE_TOKEN_ID) of the prompt's token
embeddings -> the language model with positions counted over real tokens.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from gin_reference_torch import GNN, randomize_
from safetensors.torch import load_file, save_file
from torch import nn

from omnimol_jax.constants import IMAGE_TOKEN_ID

PREFIX = "base_model.model."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOE_MODES = {"first_half": lambda n: list(range(n // 2)), "second_half": lambda n: list(range(n // 2, n)),
             "sparse": lambda n: list(range(n))[::4], "dense": lambda n: list(range(n)),
             "second_quarter": lambda n: list(range(n - n // 4, n))}


class LearnableAlpha(nn.Module):
    def __init__(self, alpha: float):
        super().__init__()
        self.weights = nn.Parameter(torch.tensor([alpha, 0.0, 0.5]))

    def scale(self, rank: int) -> torch.Tensor:
        # The public merge (get_delta_weight) clamps a to 15.9..16.1 whatever lora_alpha is.
        a, b, p = self.weights.float().unbind(0)
        return a.clamp(15.9, 16.1) / float(rank) ** p.clamp(0.49, 0.51) + b.clamp(-0.05, 0.05)


class GALLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, gal: bool):
        super().__init__()
        self.base_layer, self.rank, self.alpha = base, rank, alpha
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        if gal:
            self.lora_learnable_alpha = LearnableAlpha(alpha)

    def forward(self, x):
        scale = self.lora_learnable_alpha.scale(self.rank) if hasattr(self, "lora_learnable_alpha") \
            else self.alpha / self.rank
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * scale


class MoEBlock(nn.Module):
    """DeepseekV2MoE as the public code configures it: softmax router in fp32, greedy top-k, no renormalisation
    unless norm_topk_prob, the routed experts' outputs weighted and summed, plus the shared expert."""

    def __init__(self, mlp: nn.Module, hidden: int, num_experts: int, top_k: int, shared: bool, norm_topk: bool):
        super().__init__()
        self.top_k, self.norm_topk = top_k, norm_topk
        self.experts = nn.ModuleList([copy.deepcopy(mlp) for _ in range(num_experts)])
        if shared:
            self.shared_experts = copy.deepcopy(mlp)
        self.moe_gate = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, h):
        probs = torch.softmax(nn.functional.linear(h.float(), self.moe_gate.weight.float()), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            w = (weights * (chosen == e)).sum(-1, keepdim=True).to(h.dtype)
            out = out + w * expert(h)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(h)
        return out


def _wrap_targets(module: nn.Module, targets, rank, alpha, gal):
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name in targets:
            setattr(module, name, GALLoRALinear(child, rank, alpha, gal))
        else:
            _wrap_targets(child, targets, rank, alpha, gal)


class ReleasedOmniMol(nn.Module):
    def __init__(self, llama: transformers.LlamaForCausalLM, release: dict, adapter: dict | None):
        super().__init__()
        self.language_model = llama
        hidden = llama.config.hidden_size
        if release.get("moe_enable"):
            moe = release["moe_config"]
            layers = moe.get("moe_layers_idx") or MOE_MODES[moe["moe_mode"]](llama.config.num_hidden_layers)
            for layer, experts in zip(layers, moe["num_experts"]):
                decoder = llama.model.layers[layer]
                decoder.mlp = MoEBlock(decoder.mlp, hidden, experts, moe["top_k_experts"], moe["use_residual"],
                                       bool(release.get("norm_topk_prob")))
        if adapter is not None:
            gal = adapter.get("use_learnable_alpha", False) and adapter["lora_alpha"] / adapter["r"] != 1
            _wrap_targets(llama.model, adapter["target_modules"], adapter["r"], adapter["lora_alpha"], gal)
        graph = release["graph_config"]
        self.mm_projector = nn.Module()
        self.mm_projector.weight = nn.Linear(graph["hidden_size"], hidden)
        self.gnn = GNN(graph["encoder_num_layer"], graph["hidden_size"])

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, graphs) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(input_ids, np.int64))
        mask = torch.from_numpy(np.asarray(attention_mask, np.int64))
        embeds = self.language_model.get_input_embeddings()(ids.clamp(min=0)).clone()
        for row, graph in enumerate(graphs):
            slots = (ids[row] == IMAGE_TOKEN_ID).nonzero().squeeze(-1)
            if graph is None:
                assert slots.numel() == 0
                continue
            nodes = self.gnn(torch.from_numpy(graph.node_features.astype(np.int64)),
                             torch.from_numpy(graph.edge_index.astype(np.int64)),
                             torch.from_numpy(graph.edge_features.astype(np.int64)))
            embeds[row, slots] = self.mm_projector.weight(nodes).to(embeds.dtype)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                   position_ids=positions).logits.float().numpy()


# --------------------------------------------------------------------------------------------------
# Building, writing and loading release folders


def tiny_llama(seed: int = 0, layers: int = 4, tied: bool = True) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128}, rope_theta=500000.0, pad_token_id=0)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def release_configs(llama, *, moe: dict | None, rank=4, alpha=16.0, targets=TARGETS, gal=True, graph_layers=2,
                    graph_width=32):
    release = {"architectures": ["GraphLlavaForConditionalGeneration"], "model_type": "llava",
               "language_backbone_name": "llama", "projector_type": "naive_linear", "moe_enable": moe is not None,
               "norm_topk_prob": None, "ignore_index": -100, "image_token_index": -200,
               "graph_config": {"model_type": "graph", "encoder_num_layer": graph_layers, "hidden_size": graph_width,
                                "encoder_JK": "last", "encoder_drop_ratio": 0.1, "encoder_gnn_type": "gin"},
               "projector_config": {"model_type": "projector", "projector_type": "linear"},
               "text_config": {**llama.config.to_dict(), "moe_enable": moe is not None}}
    if moe is not None:
        release["moe_config"] = {"model_type": "moe_module", "moe_class": "deepseek", "router_aux_loss_coef": 0.01,
                                 "use_residual": True, "top_k_experts": 2, **moe}
    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05,
               "target_modules": list(targets), "bias": "none", "use_rslora": False, "use_dora": False,
               "use_learnable_alpha": gal, "base_model_name_or_path": None}
    return release, adapter


def trained(model: ReleasedOmniMol, seed: int = 0) -> ReleasedOmniMol:
    """Nonzero B, GAL scalars off-centre inside their boxes, distinct routers, projector and GIN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("lora_A.weight"):
                p.copy_(torch.empty(p.shape).uniform_(-0.3, 0.3, generator=g))
            elif name.endswith("lora_learnable_alpha.weights"):
                low, high = torch.tensor([15.9, -0.05, 0.49]), torch.tensor([16.1, 0.05, 0.51])
                p.copy_(low + (high - low) * torch.rand(3, generator=g))
            elif name.endswith("moe_gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.startswith("mm_projector"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    randomize_(model.gnn, seed)
    return model.eval()


def write_release(model: ReleasedOmniMol, release: dict, adapter: dict | None, folder: Path, base: Path,
                  moleculestm: Path, dtype=torch.float32, stage1: bool = False) -> None:
    """Writes the release files of docs/omnimol.md §7 from the model's state dict (and its base Llama and GIN)."""
    folder.mkdir(parents=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # The frozen base: base_layer weights at their plain names; an MoE layer's frozen MLP is any expert's copy.
    base_state = {}
    for key, value in state.items():
        if not key.startswith("language_model.") or "lora_" in key or "moe_gate" in key:
            continue
        name = key[len("language_model."):].replace(".base_layer", "")
        if ".mlp.experts." in name:
            head, tail = name.split(".mlp.experts.", 1)
            if not tail.startswith("0."):
                continue
            name = f"{head}.mlp.{tail[2:]}"
        elif ".mlp.shared_experts." in name:
            continue
        base_state[name] = value
    llama = transformers.LlamaForCausalLM(copy.deepcopy(model.language_model.config)).eval()
    missing, unexpected = llama.load_state_dict(base_state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    llama.to(dtype).save_pretrained(base)
    release = dict(release, text_config=dict(release["text_config"], _name_or_path=str(base)))
    (folder / "config.json").write_text(json.dumps(release, indent=2))
    projector = {k: v for k, v in state.items() if k.startswith("mm_projector.")}
    if stage1:
        torch.save({f"model.{k}": v.to(dtype) for k, v in projector.items()}, folder / "mm_projector.bin")
    else:
        (folder / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
        save_file({PREFIX + k: v.to(dtype).contiguous() for k, v in state.items() if "lora_" in k},
                  folder / "adapter_model.safetensors", metadata={"format": "pt"})
        torch.save({PREFIX + k: v.to(dtype) for k, v in state.items() if "moe_gate" in k or k in projector},
                   folder / "non_lora_trainables.bin")
    gnn = {f"molecule_node_model.{k}": v for k, v in model.gnn.state_dict().items()}
    gnn["graph_pred_linear.weight"] = torch.zeros(1, model.gnn.atom_encoder.atom_embedding_list[0].weight.shape[1])
    torch.save(gnn, moleculestm)


def load_release(folder: Path, moleculestm: Path) -> ReleasedOmniMol:
    """The public evaluation's order: config -> base Llama from text_config._name_or_path -> graph -> MoE blocks ->
    non-LoRA weights (prefix stripped) -> adapter; fp32. Every file key must land in the model."""
    folder = Path(folder)
    release = json.loads((folder / "config.json").read_text())
    base = release["text_config"]["_name_or_path"]
    llama = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    adapter_path = folder / "adapter_config.json"
    adapter = json.loads(adapter_path.read_text()) if adapter_path.is_file() else None
    model = ReleasedOmniMol(llama.eval(), release, adapter)
    gnn = {k[len("molecule_node_model."):]: v for k, v in torch.load(moleculestm, weights_only=True).items()
           if k.startswith("molecule_node_model.")}
    model.gnn.load_state_dict(gnn, strict=True)
    own = model.state_dict()
    loaded = {}
    if adapter is None:
        stage1 = torch.load(folder / "mm_projector.bin", weights_only=True)
        loaded.update({"mm_projector." + k.split("mm_projector.", 1)[1]: v for k, v in stage1.items()})
    else:
        non_lora = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
        loaded.update({k[len(PREFIX):]: v for k, v in non_lora.items()})
        adapter_state = (load_file(str(folder / "adapter_model.safetensors"))
                         if (folder / "adapter_model.safetensors").is_file()
                         else torch.load(folder / "adapter_model.bin", weights_only=True))
        loaded.update({k[len(PREFIX):]: v for k, v in adapter_state.items()})
        lora_keys = {k for k in own if "lora_" in k}
        assert lora_keys == {k for k in loaded if "lora_" in k}, "adapter keys differ from the model's"
    unknown = sorted(set(loaded) - set(own))
    assert not unknown, unknown
    model.load_state_dict({k: v.float() for k, v in loaded.items()}, strict=False)
    return model.eval()
