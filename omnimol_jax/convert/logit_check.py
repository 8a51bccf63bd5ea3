"""Logit checker: our checkpoint vs `transformers.LlamaForCausalLM` on the exported/original HF folder.

Runs both on a short and a ~500-token prompt (random token ids, seeded) and reports max |logit diff|,
mean KL(hf || ours) and top-1 agreement. torch is needed only here (install `torch==2.13.0`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnimol_jax.errors import RunError


@dataclasses.dataclass
class LogitReport:
    seq_len: int
    max_abs_diff: float
    mean_kl: float
    top1_agreement: float

    def ok(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ours: np.ndarray, reference: np.ndarray, seq_len: int) -> LogitReport:
    lp_ours, lp_ref = _log_softmax(ours), _log_softmax(reference)
    kl = (np.exp(lp_ref) * (lp_ref - lp_ours)).sum(-1).mean()
    return LogitReport(seq_len=seq_len, max_abs_diff=float(np.abs(ours - reference).max()), mean_kl=float(kl),
                       top1_agreement=float((ours.argmax(-1) == reference.argmax(-1)).mean()))


def check_against_hf(checkpoint: str | Path, hf_dir: str | Path, seq_lens: Sequence[int] = (8, 500),
                     batch: int = 2, seed: int = 0) -> list[LogitReport]:
    try:
        import torch
        import transformers
    except ImportError as err:
        raise RunError("the logit checker needs torch and transformers: pip install torch==2.13.0") from err
    from omnimol_jax.checkpoint import CheckpointError, load_llama, read_metadata

    model_config, meta = read_metadata(checkpoint)
    if meta.get("graph") is not None:
        raise CheckpointError(f"{checkpoint} is a full Omni-Mol model (graph tower, projector, language model); "
                              "check-hf compares a plain Llama checkpoint (omnimol init, import-hf) with its HF "
                              "folder")
    if model_config.lora.enabled or model_config.moge.enabled:
        raise CheckpointError(f"{checkpoint} has LoRA/MoGE adapters, which a stock LlamaForCausalLM does not "
                              "have; check-hf compares a plain Llama checkpoint with its HF folder")
    model = load_llama(checkpoint)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_model.config._attn_implementation = "eager"
    forward = jax.jit(lambda m, ids: m(ids).logits.astype(jnp.float32))
    rng = np.random.default_rng(seed)
    reports = []
    for seq_len in seq_lens:
        ids = rng.integers(0, model.config.vocab_size, (batch, seq_len)).astype(np.int32)
        ours = np.asarray(forward(model, jnp.asarray(ids)))
        with torch.no_grad():
            reference = hf_model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
        reports.append(compare_logits(ours, reference, seq_len))
    return reports
