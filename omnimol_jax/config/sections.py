"""The sections of a run config (model, LoRA, MoGE, graph, data, mesh, init, train) as frozen dataclasses, each
with its defaults and its `validate()`. Sections validate in one style: `_require(condition, dotted key,
message)` raising ConfigError. How YAML and overrides become these: loading.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from omnimol_jax import tasks
from omnimol_jax.constants import FEATURE_MODES, LAYOUTS, OGB_ATOM_FEATURE_DIMS, OGB_BOND_FEATURE_DIMS, SPLITS
from omnimol_jax.errors import InputError


class ConfigError(InputError):
    """A configuration key or value is invalid. The message names the dotted key."""


DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out"]


LoRATarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MoGELayerSet = Literal["last_quarter", "first_half", "second_half", "every_4th", "all"]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (docs/omnimol.md §2): y = W x + s * B A dropout(x), W frozen.

    `enabled` puts one adapter on each target projection of attention and of the non-MoE FFNs. MoGE experts
    always carry their own adapters with these rank/alpha/GAL settings.
    """

    enabled: bool = False
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[LoRATarget, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # GAL: s = clip(a, *gal_a_range) / rank ** clip(p, *gal_p_range) + clip(b, *gal_b_range), a/b/p learnable.
    gal: bool = True
    gal_a_init: float = 16.0
    gal_b_init: float = 0.0
    gal_p_init: float = 0.5
    gal_a_range: tuple[float, float] = (15.9, 16.1)
    gal_b_range: tuple[float, float] = (-0.05, 0.05)
    gal_p_range: tuple[float, float] = (0.49, 0.51)
    param_dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        _require(self.rank > 0, "model.lora.rank", f"must be positive, got {self.rank}")
        _require(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("gal_a_range", "gal_b_range", "gal_p_range"):
            low, high = getattr(self, name)
            _require(low <= high, f"model.lora.{name}", f"low {low} > high {high}")


@dataclasses.dataclass(frozen=True)
class MoGEConfig:
    """Mixture of GAL-LoRA experts on the FFN of selected layers (docs/omnimol.md §3)."""

    enabled: bool = False
    layers: MoGELayerSet = "last_quarter"
    # Exactly these layers instead (the public code's `moe_layers_idx`; its moe_mode `sparse` is [0, 4, 8, ...]).
    layer_list: tuple[int, ...] = ()
    num_experts: int = 5
    num_shared_experts: int = 1
    top_k: int = 2
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # Per-expert LoRA ranks (the paper's rank adaptivity); None = every expert uses lora.rank.
    expert_ranks: Optional[tuple[int, ...]] = None
    aux_loss_alpha: float = 1.0
    # The train step adds aux_loss_coef * (sum over MoE layers of the aux loss).
    aux_loss_coef: float = 0.01
    aux_loss_stop_gradient: bool = False
    # The reference counts every position (pads included); true restricts the aux loss to real tokens.
    aux_loss_ignore_padding: bool = False
    # stacked (default): frozen gate/up once per token, one down projection of the weighted sum, and the LoRA
    # work in the rank-r space (at 1B shapes half of fused's temporaries and bytes for +10-20% FLOPs; CPU time
    # equal); fused: the same frozen work with one [tokens, ffn] LoRA delta per expert; naive: every selected
    # expert evaluates its full FFN (the reference's structure). All three compute the same numbers.
    implementation: Literal["stacked", "fused", "naive"] = "stacked"

    def validate(self) -> None:
        _require(self.num_experts >= 1, "model.moge.num_experts", f"must be >= 1, got {self.num_experts}")
        _require(1 <= self.top_k <= self.num_experts, "model.moge.top_k",
                 f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _require(self.num_shared_experts in (0, 1), "model.moge.num_shared_experts",
                 f"0 or 1 shared expert is supported, got {self.num_shared_experts}")
        if self.expert_ranks is not None:
            _require(len(self.expert_ranks) == self.num_experts, "model.moge.expert_ranks",
                     f"needs one rank per routed expert ({self.num_experts}), got {len(self.expert_ranks)}")
            _require(all(r > 0 for r in self.expert_ranks), "model.moge.expert_ranks", "ranks must be positive")

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        if not self.enabled:
            return ()
        if self.layer_list:
            return tuple(sorted(set(self.layer_list)))
        selections = {
            "last_quarter": range(num_layers - num_layers // 4, num_layers),
            "first_half": range(num_layers // 2),
            "second_half": range(num_layers // 2, num_layers),
            "every_4th": range(3, num_layers, 4),
            "all": range(num_layers),
        }
        return tuple(selections[self.layers])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the Llama decoder. Field names follow HF `LlamaConfig` where one exists."""

    preset: Optional[str] = None
    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_layers: int = 16
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # default | linear | llama3 (the llama3 frequency scaling; the other fields below apply to it)
    rope_type: Literal["default", "linear", "llama3"] = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # Storage dtype of parameters and the dtype matmuls run in. Norms and softmax always run in fp32.
    param_dtype: DType = "float32"
    dtype: DType = "float32"
    remat_policy: RematPolicy = "none"
    # Run each repeating group of decoder layers as one lax.scan: one compiled body per group, so compile time grows
    # far less with depth (16 layers: 0.58x) and XLA keeps fewer temporaries on CPU; parameters and checkpoints are
    # the same either way. Off by default: at the demo's 4 layers the scanned step is 1.26x slower, and at the 1B
    # recipe's remat policy it needs 1.5x the memory on TPU (docs/results.md). Decoding with a KV cache runs unrolled.
    scan_layers: bool = False
    # blockwise (default): einsum attention attention_block queries at a time over the keys up to the block's end
    # (causally masked key blocks skipped), each block's scores rematerialised.
    # block_sparse: flash-style tiles of attention_block x attention_block, computed only where a row's mask has an
    # unmasked entry (causal, segment and padding tiles skipped per row, forward and backward); rows run one after
    # another on each device. einsum: portable XLA attention over all keys; jax: jax.nn.dot_product_attention with
    # the dense mask, which in jax 0.10-0.12 runs XLA's implementation on every platform (docs/model.md).
    # splash: jax's Pallas TPU flash kernel (model/splash.py): tiles in VMEM, empty causal/segment tiles skipped,
    # GQA without repeated K/V; splash_block_q x splash_block_kv tiles (multiples of 128); Pallas interpret mode
    # on CPU (slow: for tests), no GPU. flash: jax's Pallas GPU kernel (model/flash.py, Triton) with segment ids,
    # attention_block tiles, K/V repeated per query group; interpret mode on CPU, no TPU.
    # Training and a one-chunk prefill use the chosen kernel; decoding steps over the cache use einsum (or jax).
    attention_impl: Literal["blockwise", "block_sparse", "einsum", "jax", "splash", "flash"] = "blockwise"
    attention_block: int = 128
    splash_block_q: int = 512
    splash_block_kv: int = 512
    bos_token_id: Optional[int] = 128000
    eos_token_id: Optional[int] = 128009
    pad_token_id: Optional[int] = 128004
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    moge: MoGEConfig = dataclasses.field(default_factory=MoGEConfig)

    def position_overflow(self, prompt_tokens: int, new_tokens: int) -> Optional[str]:
        """Why a prompt plus its generation does not fit the model's positions, or None when it does."""
        if prompt_tokens + new_tokens <= self.max_position_embeddings:
            return None
        return (f"prompt of {prompt_tokens} tokens + {new_tokens} new tokens exceeds the model's "
                f"{self.max_position_embeddings} positions")

    def validate(self) -> None:
        _require(self.num_heads % self.num_kv_heads == 0, "model.num_heads",
                 f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        _require(self.head_dim % 2 == 0, "model.head_dim", f"head_dim={self.head_dim} must be even for RoPE")
        _require(self.attention_block >= 1, "model.attention_block", f"must be >= 1, got {self.attention_block}")
        for key in ("splash_block_q", "splash_block_kv"):
            value = getattr(self, key)
            _require(value >= 128 and value % 128 == 0, f"model.{key}", f"must be a multiple of 128, got {value}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        if self.rope_type == "llama3":
            _require(self.rope_high_freq_factor > self.rope_low_freq_factor, "model.rope_high_freq_factor",
                     "llama3 rope scaling needs high_freq_factor > low_freq_factor")
        if self.rope_type != "default":
            _require(self.rope_factor >= 1.0, "model.rope_factor", f"must be >= 1, got {self.rope_factor}")
        self.lora.validate()
        self.moge.validate()
        if self.moge.enabled:
            _require(len(self.moge.layer_indices(self.num_layers)) > 0, "model.moge.layers",
                     f"'{self.moge.layers}' selects no layer of {self.num_layers}")
            outside = [i for i in self.moge.layer_list if not 0 <= i < self.num_layers]
            _require(not outside, "model.moge.layer_list",
                     f"{outside} are not layers of a {self.num_layers}-layer model (0 to {self.num_layers - 1})")


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """The molecule side: RDKit features, the MoleculeSTM GIN and the projector into the LLM (docs/omnimol.md §1).

    The one place the feature mode lives: the pipeline featurises with it and the GIN sums the columns it gives.
    """

    # omnimol: 2 atom + 2 bond features (what the released checkpoints saw); ogb: all 9 + 3.
    feature_mode: Literal["omnimol", "ogb"] = "omnimol"
    num_layers: int = 5
    hidden_size: int = 300
    projector_type: Literal["linear", "mlp2x_silu"] = "linear"
    # A tower that starts random (no init.moleculestm, none in init.checkpoint) gets its batch-norm statistics
    # from this many training graphs before step 0 (GIN.calibrate_batch_norms); 0 keeps the (0, 1) defaults.
    calibration_graphs: int = 512
    # The embedding tables hold every OGB column, so one tower serves both feature modes.
    atom_feature_dims: tuple[int, ...] = OGB_ATOM_FEATURE_DIMS
    bond_feature_dims: tuple[int, ...] = OGB_BOND_FEATURE_DIMS
    batch_norm_eps: float = 1e-5  # torch BatchNorm1d default

    def validate(self) -> None:
        _require(self.feature_mode in FEATURE_MODES, "graph.feature_mode",
                 f"{self.feature_mode!r} is not one of {FEATURE_MODES}")
        _require(self.num_layers >= 1, "graph.num_layers", f"must be >= 1, got {self.num_layers}")
        _require(self.hidden_size >= 1, "graph.hidden_size", f"must be >= 1, got {self.hidden_size}")
        _require(self.calibration_graphs >= 0, "graph.calibration_graphs",
                 f"must be >= 0, got {self.calibration_graphs}")
        _require(len(self.atom_feature_dims) >= 9 and len(self.bond_feature_dims) >= 3, "graph.atom_feature_dims",
                 "the tables need all 9 atom and 3 bond OGB columns")


BATCHING_MODES = ("pack", "bucket", "pad")
CHAT_FORMATS = ("auto", "llama3", "template")
OVERLONG_MODES = ("reject", "truncate")
MIXTURE_MODES = ("concat", "weighted")


@dataclasses.dataclass
class DataConfig:
    """Data pipeline settings (the `data` section of the run config). Graph features: `graph.feature_mode`."""

    data_dir: str = "data/builtin"
    layout: str = "omnimol"  # omnimol (Omni-Mol release / built-in corpus) | mol_instructions
    # "all" (every task with a file in data_dir), "paper" (those of the paper's 16 tasks) or
    # "task[:value]/task[:value]/..."; the value is the kept fraction (concat) or the weight (weighted), default 1.
    tasks: str = "all"
    mixture: str = "concat"  # concat | weighted
    split: str = "train"
    tokenizer: str = ""  # tokenizer.json or a folder holding one; "" = <data_dir>/tokenizer
    double_bos: bool = True  # the tokenizer call's own BOS before the template's, as the public code (Llama 3: two)
    # How a conversation is written: llama3 = the Omni-Mol Llama-3 conversation (what released checkpoints saw);
    # template = the tokenizer's own chat template; auto = llama3 for a tokenizer with Llama 3's header tokens.
    chat_format: str = "auto"
    # false: no graph tokens, molecules reach the model as SELFIES text only (the ablation of the graph modality)
    graph_tokens: bool = True
    seq_len: int = 512  # tokens per row (graph slots included)
    # Rows per optimizer step over all processes and micro-batches (config/batch.py): the same run on any topology
    global_batch_size: int = 8
    batching: str = "pack"  # pack | bucket | pad
    max_samples_per_row: int = 8  # packing: samples (segments) per row
    nodes_per_row: int = 0  # atoms per row; 0 = seq_len // 4
    edges_per_row: int = 0  # directed bonds per row; 0 = 3 * nodes_per_row
    pack_window_batches: int = 8  # packing bins = rows per process batch * this
    bucket_boundaries: tuple[int, ...] = ()  # bucket row lengths; () = seq_len/8, /4, /2, 1 (multiples of 8)
    bucket_window_batches: int = 16  # samples sorted into buckets per window = rows per process batch * this
    strict: bool = False  # check every record before training and stop on the first bad one, instead of skipping
    allow_empty_tasks: bool = False  # train on when every checked record of a task is unusable (else: stop)
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None  # None: repeat forever
    num_threads: int = 2  # Grain read threads per process
    num_workers: int = 0  # Grain worker processes (0: none)
    prefetch_batches: int = 2  # batches prepared ahead by DataIterator's thread (0: no thread)
    process_index: Optional[int] = None  # None: jax.process_index()
    process_count: Optional[int] = None  # None: jax.process_count()
    molcap_drop_selfies_if_too_long: bool = True  # as the public code: retry molcap with the question only
    # A sample longer than seq_len: 'reject' skips it (counted per task as too_long); 'truncate' keeps its first
    # seq_len tokens, as the public code does (counted per task as truncated; one whose answer starts beyond
    # seq_len has nothing to learn from and is still rejected).
    overlong: str = "reject"
    # Fail (naming the reasons) after this many rejected records in a row, instead of cycling forever through
    # a stream in which nothing fits (e.g. seq_len far too short).
    max_consecutive_rejections: int = 5000
    max_logged_examples: int = 3  # first bad records logged per (task, reason)

    def validate(self) -> None:
        _require(self.layout in LAYOUTS, "data.layout", f"{self.layout!r} is not one of {LAYOUTS}")
        _require(self.mixture in MIXTURE_MODES, "data.mixture", f"{self.mixture!r} is not one of {MIXTURE_MODES}")
        _require(self.batching in BATCHING_MODES, "data.batching",
                 f"{self.batching!r} is not one of {BATCHING_MODES}")
        _require(self.split in SPLITS, "data.split", f"{self.split!r} is not one of {SPLITS}")
        _require(self.chat_format in CHAT_FORMATS, "data.chat_format",
                 f"{self.chat_format!r} is not one of {CHAT_FORMATS}")
        _require(self.overlong in OVERLONG_MODES, "data.overlong", f"{self.overlong!r} is not one of {OVERLONG_MODES}")
        _require(self.seq_len >= 16, "data.seq_len", f"must be >= 16, got {self.seq_len}")
        _require(self.global_batch_size >= 1, "data.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        _require(self.max_samples_per_row >= 1, "data.max_samples_per_row", "must be >= 1")
        _require(self.nodes_per_row >= 0 and self.edges_per_row >= 0, "data.nodes_per_row", "budgets must be >= 0")
        _require(self.pack_window_batches >= 1 and self.bucket_window_batches >= 1, "data.pack_window_batches",
                 "window sizes must be >= 1")
        _require(self.num_epochs is None or self.num_epochs >= 1, "data.num_epochs", "must be >= 1 or null")
        _require(0 <= self.seed < 2 ** 31, "data.seed", "must be in [0, 2**31)")
        if self.process_index is not None or self.process_count is not None:
            _require(self.process_index is not None and self.process_count is not None, "data.process_index",
                     "set both process_index and process_count, or neither")
            _require(0 <= self.process_index < self.process_count, "data.process_index",
                     f"must be in [0, {self.process_count})")
        boundaries = list(self.bucket_boundaries)
        _require(boundaries == sorted(boundaries) and all(b > 0 for b in boundaries)
                 and (not boundaries or boundaries[-1] <= self.seq_len), "data.bucket_boundaries",
                 f"must be increasing, positive and at most seq_len, got {boundaries}")
        try:
            tasks.parse_task_list(self.tasks, self.mixture, key="data.tasks")
        except tasks.TaskListError as err:
            raise ConfigError(str(err)) from None

    @property
    def row_nodes(self) -> int:
        return self.nodes_per_row or self.seq_len // 4

    @property
    def row_edges(self) -> int:
        return self.edges_per_row or 3 * self.row_nodes

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.bucket_boundaries:
            boundaries = list(self.bucket_boundaries)
            return tuple(boundaries if boundaries[-1] == self.seq_len else boundaries + [self.seq_len])
        fractions = (8, 4, 2)
        found = sorted({max(8, (self.seq_len // f) // 8 * 8) for f in fractions if self.seq_len // f >= 8})
        return tuple(b for b in found if b < self.seq_len) + (self.seq_len,)

    @property
    def segments_per_row(self) -> int:
        return self.max_samples_per_row if self.batching == "pack" else 1

    def tokenizer_path(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.data_dir) / "tokenizer"


@dataclasses.dataclass
class MeshConfig:
    """Device mesh axis sizes; -1 means 'all remaining devices' (at most one axis may say so)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def validate(self) -> None:
        sizes = dataclasses.asdict(self)
        fills = [k for k, v in sizes.items() if v == -1]
        _require(len(fills) <= 1, "mesh", f"at most one axis may be -1, got {fills}")
        for key, value in sizes.items():
            _require(value == -1 or value >= 1, f"mesh.{key}", f"must be -1 or >= 1, got {value}")


@dataclasses.dataclass
class InitConfig:
    """Where the weights of a run come from. Unset paths mean random initialisation (seeded)."""

    hf: Optional[str] = None             # a HF Llama folder (config.json + safetensors) for the language model
    # a GGUF Llama file, or a packaged model's name (smollm2-135m-instruct), for the language model: imported once
    # into the user cache (convert/gguf_llama.py)
    gguf: Optional[str] = None
    checkpoint: Optional[str] = None     # an omnimol model checkpoint (language-model-only or full Omni-Mol)
    moleculestm: Optional[str] = None    # MoleculeSTM `molecule_model.pth` for the graph tower
    # a full Omni-Mol checkpoint (e.g. stage 1's) to take the projector from, and the graph tower unless moleculestm
    # gives one (a stage-1 run without MoleculeSTM weights trains its tower: train.graph_tower=auto)
    projector: Optional[str] = None

    def validate(self) -> None:
        given = [f"init.{k}" for k in ("hf", "gguf", "checkpoint") if getattr(self, k)]
        _require(len(given) <= 1, given[0] if given else "init",
                 f"give one source for the language model, not {' and '.join(given)}")


@dataclasses.dataclass
class TrainConfig:
    """The optimisation recipe (docs/omnimol.md §4) and the run's bookkeeping."""

    stage: int = 2                       # 1: projector alignment (only the projector trains); 2: MoGE SFT
    # Regexes over '/'-joined parameter paths that train on top of the stage's set (e.g. ["language_model",
    # "graph_tower"] for a from-scratch model). Empty = the paper's recipe: the backbone stays frozen.
    unfreeze: list[str] = dataclasses.field(default_factory=list)
    # The graph tower: "stage" = as the stage says (frozen, as the paper's MoleculeSTM tower) plus train.unfreeze;
    # "auto" = trained too when it starts random (no init.moleculestm, none from init.projector / a full
    # init.checkpoint), frozen when pretrained weights are loaded; "always" = trained.
    graph_tower: Literal["stage", "auto", "always"] = "stage"
    output_dir: str = "runs/omnimol"
    max_steps: int = 1000                # optimizer steps
    learning_rate: float = 8e-5
    warmup_ratio: float = 0.0075
    min_lr_ratio: float = 0.0            # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0          # 0 disables clipping
    grad_accum_steps: int = 1            # micro-batches per optimizer step (data.global_batch_size in all)
    task_balanced_loss: bool = False     # mean over tasks of L_t / stopgrad(L_t + 1e-5), per micro-batch
    # Output head + CE this many positions at a time, so [batch, seq, vocab] fp32 logits never exist (0: at once)
    loss_chunk: int = 512
    log_every: int = 10
    eval_every: int = 0                  # 0: evaluate only at the end
    eval_batches: int = 8                # validation batches (test split) per evaluation
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    max_consecutive_nonfinite: int = 5   # skipped updates in a row before the run stops (with a checkpoint)
    profile_steps: str = ""              # "10:15": jax.profiler trace of steps 10..14
    peak_flops_per_device: float = 0.0   # for MFU; 0 = known accelerator table, or measured on CPU
    export_final: bool = True            # write a model checkpoint at <output_dir>/final
    # Keys (or sections, e.g. "data") allowed to differ from the config the run's checkpoints were written with
    # (train/config_contract.py: bookkeeping keys may always change; these would otherwise stop the resume).
    allow_config_change: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        _require(self.stage in (1, 2), "train.stage", f"must be 1 or 2, got {self.stage}")
        for pattern in self.unfreeze:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"train.unfreeze: {pattern!r} is not a regular expression ({err})") from None
        _require(self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _require(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _require(self.loss_chunk >= 0, "train.loss_chunk", f"must be >= 0 (0: no chunking), got {self.loss_chunk}")
        for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_consecutive_nonfinite", "eval_batches"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.eval_every >= 0, "train.eval_every",
                 f"must be >= 0 (0: validate at the end only), got {self.eval_every}")
        self.profile_range()

    def profile_range(self) -> Optional[tuple[int, int]]:
        """(START, STOP) of train.profile_steps, None when unset; ConfigError when malformed."""
        if not self.profile_steps:
            return None
        parts = self.profile_steps.split(":")
        ok = len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1])
        _require(ok, "train.profile_steps", f"expected START:STOP with START < STOP, got {self.profile_steps!r}")
        return int(parts[0]), int(parts[1])


@dataclasses.dataclass
class Config:
    """The whole run configuration."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    graph: GraphConfig = dataclasses.field(default_factory=GraphConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    seed: int = 0
    run_name: str = "omnimol"

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if hasattr(value, "validate"):
                value.validate()
        _require(self.data.global_batch_size % self.train.grad_accum_steps == 0, "data.global_batch_size",
                 f"{self.data.global_batch_size} rows do not divide into train.grad_accum_steps="
                 f"{self.train.grad_accum_steps} micro-batches")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""
