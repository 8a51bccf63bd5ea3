"""Logit checker: our checkpoint's language model vs transformers on an exported or original HF folder.

The HF folder is loaded with stock `AutoModelForCausalLM` (a Llama, or the Qwen2-MoE of a MoGE export), and with
stock `peft.PeftModel.from_pretrained` on top when it holds an `adapter/` folder (export-hf --format peft). The
checkpoint may be a plain Llama, one with LoRA/MoGE adapters, or a full Omni-Mol model (its language model is
compared; prompts carry no graph). Both run a short and a ~500-token prompt (random token ids, seeded) and the
report gives max |logit diff|, mean KL(hf || ours) and top-1 agreement. torch is needed only here (install
`torch==2.13.0`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

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
    max_abs_logit: float  # the reference's largest |logit|: fp32 rounding grows with it

    def ok(self, tolerance: float) -> bool:
        """max |diff| within `tolerance` times the logits' scale (at least 1): a 30-layer model with logits near 30
        differs from transformers by ~6e-4 in fp32 where a tiny one differs by ~1e-6."""
        return self.max_abs_diff <= tolerance * max(1.0, self.max_abs_logit)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ours: np.ndarray, reference: np.ndarray, seq_len: int) -> LogitReport:
    lp_ours, lp_ref = _log_softmax(ours), _log_softmax(reference)
    kl = (np.exp(lp_ref) * (lp_ref - lp_ours)).sum(-1).mean()
    return LogitReport(seq_len=seq_len, max_abs_diff=float(np.abs(ours - reference).max()), mean_kl=float(kl),
                       top1_agreement=float((ours.argmax(-1) == reference.argmax(-1)).mean()),
                       max_abs_logit=float(np.abs(reference).max()))


def _hf_folder_model(hf_dir: str | Path):
    """transformers' load of a HF folder, with its PEFT adapter on top when it holds one (export-hf --format peft)."""
    import torch
    import transformers

    from omnimol_jax.convert.hf_llama import read_hf_config

    read_hf_config(Path(hf_dir))  # a clear error for a folder that is not a HF model
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    adapter = Path(hf_dir) / "adapter"
    if (adapter / "adapter_config.json").is_file():
        try:
            import peft
        except ImportError as err:
            raise RunError(f"{adapter} is a PEFT adapter: pip install peft to check it") from err
        hf_model = peft.PeftModel.from_pretrained(hf_model, adapter)
    return hf_model


def check_against_hf(checkpoint: str | Path, hf_dir: Optional[str | Path] = None, seq_lens: Sequence[int] = (8, 500),
                     batch: int = 2, seed: int = 0, gguf: Optional[str | Path] = None) -> list[LogitReport]:
    """The checkpoint's logits against transformers' load of `hf_dir`, or of the GGUF file `gguf` (transformers'
    own GGUF loader, dequantized to fp32)."""
    if (hf_dir is None) == (gguf is None):
        raise ValueError("give exactly one of hf_dir and gguf")
    try:
        import torch
    except ImportError as err:
        raise RunError("the logit checker needs torch and transformers: pip install torch==2.13.0") from err
    from omnimol_jax.checkpoint import load_llama, load_omnimol, read_metadata

    if gguf is not None:
        from omnimol_jax.convert.gguf_llama import gguf_reference_model

        hf_model = gguf_reference_model(gguf)
    else:
        hf_model = _hf_folder_model(hf_dir)
    _, meta = read_metadata(checkpoint)
    model = load_omnimol(checkpoint)[0].language_model if meta.get("graph") is not None else load_llama(checkpoint)
    hf_model.config._attn_implementation = "eager"
    hf_model = hf_model.eval()
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
