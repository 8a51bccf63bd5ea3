"""Helpers that build the PyTorch `transformers.LlamaForCausalLM` twin of one of our models."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from omnimol_jax.checkpoint import module_params
from omnimol_jax.config import ModelConfig
from omnimol_jax.convert.hf_llama import hf_config_from_model, params_to_hf_state_dict


def torch_twin(config: ModelConfig, model, attn_implementation: str = "eager") -> transformers.LlamaForCausalLM:
    """An fp32 HF model holding exactly our model's weights (eager attention: the reference numerics)."""
    hf = hf_config_from_model(config, dtype="float32")
    hf.pop("architectures")
    hf_config = transformers.LlamaConfig(**hf)
    hf_config._attn_implementation = attn_implementation
    twin = transformers.LlamaForCausalLM(hf_config).eval()
    state_dict = {k: torch.from_numpy(np.asarray(v, np.float32).copy())
                  for k, v in params_to_hf_state_dict(config, module_params(model)).items()}
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    twin.load_state_dict(state_dict, strict=True)
    return twin


def torch_logits(twin, input_ids, attention_mask, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        out = twin(input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)),
                   attention_mask=torch.from_numpy(np.asarray(attention_mask, np.int64)),
                   position_ids=None if position_ids is None else torch.from_numpy(np.asarray(position_ids, np.int64)))
    return out.logits.float().numpy()
