"""Inference: jitted batched generation with the KV cache, and SELFIES-constrained decoding."""
from omnimol_jax.inference.decoding import (
    GenerationConfig,
    GenerationError,
    GenerationOutput,
    Generator,
    PromptBatch,
    build_prompt_batch,
    decode_answers,
    prompt_bucket,
)
from omnimol_jax.inference.selfies_constraint import (
    SelfiesConstraint,
    build_selfies_constraint,
    constraint_for_tokenizer,
    default_selfies_alphabet,
)

__all__ = [
    "GenerationConfig", "GenerationError", "GenerationOutput", "Generator", "PromptBatch", "SelfiesConstraint",
    "build_prompt_batch", "build_selfies_constraint", "constraint_for_tokenizer", "decode_answers",
    "default_selfies_alphabet", "prompt_bucket",
]
