"""Tokenizers and the chat conversations they encode.

- `load_chat_tokenizer(path)`: a HF `tokenizer.json` (e.g. Llama 3's), or a folder holding one, with its chat
  format (data/chat_format.py: the Omni-Mol Llama-3 conversation, or the folder's own chat template).
- `train_bpe_tokenizer(...)`: a small byte-level BPE for the built-in corpus, with the llama3 special tokens
  (same names and relative order) and every SELFIES symbol as one token, saved as a HF tokenizer folder
  that `transformers.AutoTokenizer` loads.
- `ChatTokenizer.encode_chat(...)`: token ids and labels of one conversation. Labels are IGNORE_INDEX
  everywhere except the assistant answer and its end-of-turn token (`<|eot_id|>`, `<|im_end|>`). The `<image>`
  placeholder becomes one IMAGE_TOKEN_ID (the pipeline expands it to one slot per atom).

The conversation is tokenized as the public code does: the rendered chat text is cut only at `<image>` and
each chunk is tokenized whole, so newline runs merge across the header cuts exactly as there; labels come from
character offsets (the answer's tokens and its end-of-turn token). The prompt ids are exactly what the model
sees at inference; without a placeholder they are exactly transformers' `apply_chat_template` ids.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from omnimol_jax.data.chat_format import (
    CHAT_FORMATS,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_OMNIMOL,
    ChatFrame,
    frame_from_template,
    hf_template_renderer,
)
from omnimol_jax.errors import InputError
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from omnimol_jax.tasks import SYSTEM_PROMPT

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# Llama 3.x special tokens 128000..128010, in their order (the reserved ones keep the ids aligned).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD,
    "<|reserved_special_token_2|>", START_HEADER, END_HEADER, "<|eom_id|>", EOT, "<|python_tag|>",
)
# The pre-tokenizer split of Llama 3's tokenizer.json.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The built-in tokenizer's split: Llama 3's, but every digit on its own (as Llama 1/2 and PaLM split numbers).
# A small BPE on a small corpus would otherwise merge only the frequent digit groups, so the same value
# could come out as "2","55" or "25","5", and a small model would have to learn numbers through ~1000
# unordered group tokens; digit by digit, every number is a sequence of 10-way choices.
BUILTIN_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
SELFIES_SYMBOL_RE = re.compile(r"\[[^\[\]]+\]")

class TokenizerError(InputError):
    pass


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    input_ids: np.ndarray  # int32 [L]; the placeholder is one IMAGE_TOKEN_ID
    labels: np.ndarray  # int32 [L]; IGNORE_INDEX outside the answer + its end-of-turn token
    image_position: int  # index of the IMAGE_TOKEN_ID, -1 without a graph


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the chat frame its conversations are written in (data/chat_format.py).

    `double_bos=True` reproduces the public code, whose tokenizer call puts the tokenizer's own special prefix
    (Llama 3: a BOS) in front of the template's text, which for Llama 3 starts with `<|begin_of_text|>` too (the
    released checkpoints saw two BOS tokens). A tokenizer that adds nothing on encode (SmolLM2) adds nothing here.
    Stop tokens: the frame's end-of-turn token, the tokenizer's eos token and the generation config's
    eos_token_id(s); the pad id is the tokenizer's pad token (Llama 3: `<|finetune_right_pad_id|>`), else its eos.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, frame: ChatFrame = LLAMA3_OMNIMOL, *, double_bos: bool = True,
                 system_prompt: str = SYSTEM_PROMPT, source: str = "", clean_up_spaces: bool = False,
                 pad_token: Optional[str] = None, stop_tokens: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.frame = frame
        self.double_bos = double_bos
        # tokenizer_config.json's clean_up_tokenization_spaces (true for Llama 3.2): transformers 4.x's decode then
        # joined " ." -> "." and the like; the reference protocol's raw answers are decoded that way too.
        self.clean_up_spaces = clean_up_spaces
        self.system_prompt = system_prompt
        self.source = source
        self.end_of_turn_id = self.token_id(frame.end_of_turn)
        # What the tokenizer's post-processor puts in front of a text (the public code's tokenizer call).
        self.call_prefix_ids = _call_prefix(tokenizer)
        self.bos_id = tokenizer.token_to_id(BOS)
        pads = [t for t in (pad_token, PAD) if t and tokenizer.token_to_id(t) is not None]
        known_stops = [tokenizer.token_to_id(t) for t in (frame.end_of_turn, *stop_tokens, EOS)]
        self.stop_ids = tuple(sorted({int(i) for i in [*known_stops, *stop_ids] if i is not None}))
        self.pad_id = tokenizer.token_to_id(pads[0]) if pads else self.stop_ids[0]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["tokenizer"] = self.tokenizer.to_str()
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["tokenizer"] = tokenizers.Tokenizer.from_str(state["tokenizer"])
        self.__dict__.update(state)

    # -- basic
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def end_of_turn(self) -> str:
        """The token text that ends an answer (`<|eot_id|>`, `<|im_end|>`)."""
        return self.frame.end_of_turn

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.source or ''} has no token {token!r}, which its chat format "
                                 f"({self.frame.name}) needs")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without added BOS/EOS (special tokens written in the text are recognised)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_like_transformers(self, ids: Iterable[int]) -> str:
        """What the public code's `tokenizer.decode(ids)` gave under transformers 4.45: special tokens kept, and the
        folder's clean-up of spaces applied when its tokenizer_config.json asks for it (transformers 5 no longer
        cleans up BPE text; the reference protocol follows the public code)."""
        text = self.decode(ids, skip_special_tokens=False)
        if self.clean_up_spaces:
            from transformers import PreTrainedTokenizerBase  # local: transformers is slow to import

            # a method that reads nothing of its tokenizer: transformers' own list of joins (" ." -> ".", ...)
            text = PreTrainedTokenizerBase.clean_up_tokenization(None, text)
        return text

    def decode_whole_characters(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """`decode` for generated text that a length limit may have cut inside a multi-byte character: the
        byte-level tokens holding that character's first bytes are left out instead of showing as U+FFFD."""
        ids = [int(i) for i in ids if int(i) >= 0]
        text = self.decode(ids, skip_special_tokens)
        for cut in range(1, min(3, len(ids)) + 1):  # a UTF-8 character has at most 3 bytes before its last
            if not text.endswith("\ufffd"):
                break
            shorter = self.decode(ids[:-cut], skip_special_tokens)
            if not shorter.endswith("\ufffd"):
                return shorter
        return text

    # -- chat format
    def render(self, user_message: str, answer: Optional[str]) -> tuple[str, int, int]:
        """(conversation text, answer start, end of the supervised span); without an answer the generation prompt
        (both positions at its end)."""
        if answer is None:
            text = self.frame.prompt(self.system_prompt, user_message)
            return text, len(text), len(text)
        return self.frame.conversation(self.system_prompt, user_message, answer)

    def _encode_conversation(self, user_message: str, answer: Optional[str]) -> EncodedChat:
        """The conversation as the public code tokenizes it: the rendered text is cut only at the `<image>`
        placeholder and each chunk is tokenized whole, so a run of newlines merges across the header cuts
        ("...<|end_header_id|>" + "\n\n" + "\nanswer" gives 1432 = "\n\n\n", not 271, 198). Labels come from
        character offsets: a token is supervised when it starts inside the answer or is its end-of-turn token;
        a token that straddles the cut (that merged newline run) belongs to the prompt, as in the reference."""
        parts = user_message.split(IMAGE_PLACEHOLDER)
        if len(parts) > 2:
            raise TokenizerError(f"a prompt may hold one {IMAGE_PLACEHOLDER} placeholder, found {len(parts) - 1}")
        text, answer_start, supervised_end = self.render(user_message, answer)
        chunks = text.split(IMAGE_PLACEHOLDER)
        ids: list[int] = list(self.call_prefix_ids) if self.double_bos else []  # the tokenizer call's own BOS
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        image_position = -1
        chunk_start = 0
        for index, chunk in enumerate(chunks):
            if index == 1:
                image_position = len(ids)
                ids.append(IMAGE_TOKEN_ID)
                labels.append(IGNORE_INDEX)
                chunk_start += len(IMAGE_PLACEHOLDER)
            encoding = self.tokenizer.encode(chunk, add_special_tokens=False)
            for token, (begin, _) in zip(encoding.ids, encoding.offsets):
                ids.append(token)
                supervised = answer is not None and answer_start <= chunk_start + begin < supervised_end
                labels.append(token if supervised else IGNORE_INDEX)
            chunk_start += len(chunk)
        return EncodedChat(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), image_position)

    def encode_prompt(self, user_message: str) -> EncodedChat:
        """The prompt up to where the answer starts (for generation)."""
        return self._encode_conversation(user_message, None)

    def encode_chat(self, user_message: str, answer: str) -> EncodedChat:
        """Ids and labels of system + user + assistant answer + the frame's end of turn."""
        return self._encode_conversation(user_message, answer)


def _call_prefix(tokenizer: tokenizers.Tokenizer) -> list[int]:
    """The ids a tokenizer call (`add_special_tokens=True`) puts before a text's own ids."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _has_llama3_tokens(tokenizer: tokenizers.Tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in (BOS, START_HEADER, END_HEADER, EOT))


def load_chat_tokenizer(path: str | os.PathLike, *, double_bos: bool = True, system_prompt: str = SYSTEM_PROMPT,
                        chat_format: str = "auto") -> ChatTokenizer:
    """Loads `tokenizer.json` (a file, or a folder holding one: a HF model or tokenizer folder) with its chat format.

    chat_format: `llama3` = the Omni-Mol Llama-3 conversation; `template` = the folder's own chat template;
    `auto` = llama3 for a tokenizer with Llama 3's header tokens, else the template (data/chat_format.py)."""
    if chat_format not in CHAT_FORMATS:
        raise TokenizerError(f"chat format {chat_format!r} is not one of {CHAT_FORMATS}")
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"{file}: cannot load tokenizer: {err}") from err
    folder = file.parent
    settings = _json_file(folder / "tokenizer_config.json")
    generation = _json_file(folder / "generation_config.json")
    eos_ids = generation.get("eos_token_id")
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else [i for i in (eos_ids or []) if isinstance(i, int)]
    if chat_format == "llama3" or (chat_format == "auto" and _has_llama3_tokens(tokenizer)):
        if not _has_llama3_tokens(tokenizer):
            raise TokenizerError(f"tokenizer {file} lacks Llama 3's special tokens ({BOS}, {START_HEADER}, "
                                 f"{END_HEADER}, {EOT}): data.chat_format=llama3 needs them")
        frame = LLAMA3_OMNIMOL
    else:
        render, specials = hf_template_renderer(folder, str(folder))
        frame = frame_from_template(render, specials, str(folder))
    return ChatTokenizer(tokenizer, frame, double_bos=double_bos, system_prompt=system_prompt, source=str(file),
                         clean_up_spaces=bool(settings.get("clean_up_tokenization_spaces", False)),
                         pad_token=_token_text(settings.get("pad_token")),
                         stop_tokens=[t for t in (_token_text(settings.get("eos_token")),) if t],
                         stop_ids=[i for i in eos_ids if 0 <= i < tokenizer.get_vocab_size(True)])


def _json_file(path: Path) -> dict:
    """A JSON object from `path`, {} when absent or unreadable (optional tokenizer-folder files)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------------------------------
# Training a small tokenizer for the built-in corpus.


def selfies_symbols_in(texts: Iterable[str]) -> list[str]:
    """Every bracketed SELFIES symbol occurring in `texts`, sorted."""
    found: set[str] = set()
    for text in texts:
        found.update(SELFIES_SYMBOL_RE.findall(text))
    return sorted(found)


def default_selfies_symbols() -> list[str]:
    """SELFIES' robust alphabet plus branch/ring symbols up to 3 and the charged/stereo atoms selfies emits."""
    import selfies  # local: selfies is only needed when training

    symbols = set(selfies.get_semantic_robust_alphabet())
    for n in (1, 2, 3):
        for bond in ("", "=", "#"):
            symbols.add(f"[{bond}Branch{n}]")
            symbols.add(f"[{bond}Ring{n}]")
        symbols.update({f"[-/Ring{n}]", f"[\\/Ring{n}]", f"[/Ring{n}]", f"[\\Ring{n}]"})
    return sorted(symbols)


def build_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096,
                        selfies_symbols: Sequence[str] = ()) -> tokenizers.Tokenizer:
    """Trains a byte-level BPE (llama3 pre-tokenizer split, single digits) on `texts` with SELFIES symbols
    removed, then adds every SELFIES symbol as one token; special tokens get ids 0..10 in llama3 order."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BUILTIN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(LLAMA3_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # SELFIES symbols become whole tokens below, so merges are spent on the natural-language text only.
    tokenizer.train_from_iterator((SELFIES_SYMBOL_RE.sub(" ", text) for text in texts), trainer=trainer)
    tokenizer.add_tokens([AddedToken(symbol, normalized=False, single_word=False)
                          for symbol in sorted(set(selfies_symbols)) if tokenizer.token_to_id(symbol) is None])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def save_hf_tokenizer(tokenizer: tokenizers.Tokenizer, out_dir: str | os.PathLike,
                      model_max_length: int = 2048, clean_up_tokenization_spaces: bool = False) -> Path:
    """Saves `tokenizer` as a HF tokenizer folder (tokenizer.json + config with the special tokens and the
    llama3 chat template) loadable by `transformers.AutoTokenizer`."""
    from transformers import PreTrainedTokenizerFast  # local: transformers is slow to import

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOT, pad_token=PAD,
                                   model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=clean_up_tokenization_spaces)
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return out_dir


def train_bpe_tokenizer(texts: Sequence[str], out_dir: str | os.PathLike, *, vocab_size: int = 4096,
                        extra_selfies_symbols: Sequence[str] = (), model_max_length: int = 2048) -> Path:
    """Trains the built-in corpus tokenizer and writes it to `out_dir` (returns the folder)."""
    symbols = set(default_selfies_symbols()) | set(selfies_symbols_in(texts)) | set(extra_selfies_symbols)
    tokenizer = build_bpe_tokenizer(texts, vocab_size=vocab_size, selfies_symbols=sorted(symbols))
    out = save_hf_tokenizer(tokenizer, out_dir, model_max_length=model_max_length)
    with open(out / "omnimol_tokenizer.json", "w") as f:
        json.dump({"kind": "byte-level BPE for the omnimol built-in corpus", "bpe_vocab_size": vocab_size,
                   "num_selfies_tokens": len(symbols), "vocab_size": tokenizer.get_vocab_size(True),
                   "special_tokens": list(LLAMA3_SPECIAL_TOKENS)}, f, indent=2)
    return out
