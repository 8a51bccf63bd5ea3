"""The real Llama-3 tokenizer as a HF tokenizer folder, built offline from the tiktoken BPE file that the
`llama-models` wheel ships (`llama_models/llama3/tokenizer.model`, 128,000 ranked byte sequences).

`transformers`' TikTokenConverter turns the ranks into a byte-level BPE (vocabulary and merges) with the Llama-3
pre-tokenizer split; the 256 special tokens of Llama 3.2 take ids 128000..128255 (`<|begin_of_text|>`,
`<|end_of_text|>`, `<|finetune_right_pad_id|>` at 128004, the header tokens at 128006/128007, `<|eom_id|>`
128008, `<|eot_id|>` 128009, reserved tokens elsewhere), and the folder carries the llama3 chat template. The
result encodes as the released tokenizer does ("Hello world" -> [9906, 1917]); nothing is downloaded.
"""
from __future__ import annotations

import base64
import importlib.util
import os
from pathlib import Path
from typing import Optional

from omnimol_jax.data.tokenizer import LLAMA3_SPECIAL_TOKENS, LLAMA3_SPLIT_PATTERN, TokenizerError, save_hf_tokenizer

NUM_BASE_TOKENS = 128_000
NUM_SPECIAL_TOKENS = 256
MODEL_MAX_LENGTH = 131_072


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3.2 in id order (128000 + index)."""
    named = list(LLAMA3_SPECIAL_TOKENS)  # 128000..128010, reserved 0..2 among them
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(named))]
    return named + reserved


def packaged_model_file() -> Path:
    """`llama_models/llama3/tokenizer.model` of the installed `llama-models` package (not imported)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the Llama-3 tokenizer file comes with the llama-models package: "
                             "pip install llama-models==0.3.0 (or pass --model-file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing from the installed llama-models package")
    return path


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken BPE file: one '<base64 bytes> <rank>' per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{number}: not a tiktoken line '<base64> <rank>'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: the ranks are not 0..{len(ranks) - 1}")
    return ranks


def build_llama3_tokenizer(out_dir: str | os.PathLike, model_file: Optional[str | os.PathLike] = None) -> Path:
    """Writes the Llama-3 tokenizer folder (tokenizer.json, tokenizer_config.json with the chat template)."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = Path(model_file) if model_file else packaged_model_file()
    ranks = read_tiktoken_ranks(model_file)
    if len(ranks) != NUM_BASE_TOKENS:
        raise TokenizerError(f"{model_file}: {len(ranks)} tokens, the Llama-3 tokenizer has {NUM_BASE_TOKENS}")

    class _LocalRanks(TikTokenConverter):  # the converter reads with tiktoken; the ranks are already here
        @staticmethod
        def load_tiktoken_bpe(_url):
            return ranks

    specials = llama3_special_tokens()
    tokenizer = _LocalRanks(vocab_file=str(model_file), pattern=LLAMA3_SPLIT_PATTERN,
                            extra_special_tokens=specials).converted()
    for index, token in enumerate(specials):
        if tokenizer.token_to_id(token) != NUM_BASE_TOKENS + index:
            raise TokenizerError(f"{token} did not get id {NUM_BASE_TOKENS + index}")
    bos = specials[0]
    # As the released tokenizer.json: one BOS in front when special tokens are added.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, NUM_BASE_TOKENS)])
    # Llama 3.2's tokenizer_config.json sets clean_up_tokenization_spaces: true
    return save_hf_tokenizer(tokenizer, out_dir, model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=True)
