"""A loaded checkpoint ready to answer: model, tokenizer, Generator (optionally SELFIES-constrained), and the
seeding that makes sampling independent of batching (what `omnimol generate` and `omnimol eval` share)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from omnimol_jax.checkpoint import ASSETS_DIR, CheckpointError, load_llama, load_omnimol, read_metadata
from omnimol_jax.config import MeshConfig
from omnimol_jax.data.tokenizer import TokenizerError, load_chat_tokenizer
from omnimol_jax.errors import InputError
from omnimol_jax.inference.decoding import Generator, language_config
from omnimol_jax.inference.number_median import NumberMedianDecoder, number_tokens_for_tokenizer
from omnimol_jax.inference.selfies_constraint import constraint_for_tokenizer
from omnimol_jax.sharding import build_mesh


class SessionError(InputError):
    """The checkpoint or its tokenizer cannot be used (the message names the path)."""


@dataclasses.dataclass
class InferenceSession:
    """A loaded checkpoint with its tokenizer and a Generator (with the SELFIES automaton when asked for)."""

    model: Any
    meta: dict
    tokenizer: Any
    generator: Any
    feature_mode: Optional[str]  # None: a plain language model (no graph tower)
    checkpoint: Path
    graph_tokens: bool = True    # False: trained with data.graph_tokens=false, molecules as text only

    def task_view(self, spec):
        """The task as this model reads it: with its graph, or as text only (no tower, or trained without graphs)."""
        from omnimol_jax.tasks import without_graph

        return spec if self.has_graph_tower and self.graph_tokens else without_graph(spec)

    @property
    def language_config(self):
        return language_config(self.model)

    @property
    def has_graph_tower(self) -> bool:
        return self.feature_mode is not None

    def decode(self, ids: Sequence[int]) -> str:
        """The clean answer: special tokens dropped, surrounding whitespace stripped."""
        return self.tokenizer.decode_whole_characters(ids, skip_special_tokens=True).strip()

    def decode_raw(self, ids: Sequence[int]) -> str:
        """The raw answer the public evaluation scores: special tokens kept (pass the stop token too), nothing
        stripped, and the tokenizer folder's clean-up of spaces applied as transformers' decode applies it (see
        eval/answers.py)."""
        return self.tokenizer.decode_like_transformers(ids)


def load_session(checkpoint: str | os.PathLike, tokenizer_path: Optional[str] = None, *,
                 double_bos: Optional[bool] = True,
                 mesh_config: Optional[MeshConfig] = None, constrained: bool = False,
                 devices: Optional[Sequence[Any]] = None) -> InferenceSession:
    """Loads a checkpoint (sharded over `mesh_config` when given, over `devices` when given: this process's own in a
    multi-process evaluation), its tokenizer and a Generator: a full Omni-Mol model, or a plain language model
    (`omnimol import-hf`, `init`), which answers text prompts only."""
    checkpoint = Path(checkpoint)
    mesh = (build_mesh(mesh_config or MeshConfig(), devices) if mesh_config is not None or devices is not None
            else None)
    try:
        _, meta = read_metadata(checkpoint)
    except (CheckpointError, FileNotFoundError) as err:
        raise SessionError(str(err)) from None
    # The tokenizer first: a checkpoint without one is refused before its weights are read
    tokenizer_source = Path(tokenizer_path) if tokenizer_path else checkpoint / ASSETS_DIR
    trained_with = meta.get("data", {})
    if double_bos is None:  # not chosen on the command line: follow the training data's convention
        double_bos = bool(trained_with.get("double_bos", True))
    try:
        tokenizer = load_chat_tokenizer(tokenizer_source, double_bos=double_bos,
                                        chat_format=trained_with.get("chat_format", "auto"))
    except (FileNotFoundError, TokenizerError) as err:
        raise SessionError(f"tokenizer: {err} (pass --tokenizer, or save the tokenizer into "
                        f"{checkpoint / ASSETS_DIR})") from None
    try:
        model = load_omnimol(checkpoint, mesh=mesh)[0] if meta.get("graph") is not None \
            else load_llama(checkpoint, mesh=mesh)
    except (CheckpointError, FileNotFoundError) as err:
        raise SessionError(str(err)) from None
    config = language_config(model)
    if tokenizer.vocab_size > config.vocab_size:
        raise SessionError(f"the tokenizer at {tokenizer_source} has {tokenizer.vocab_size} tokens, more than the "
                        f"model's vocabulary of {config.vocab_size}")
    try:
        constraint = constraint_for_tokenizer(tokenizer, config.vocab_size) if constrained else None
    except ValueError as err:  # the vocabulary cannot write SELFIES
        raise SessionError(f"--constrained with the tokenizer at {tokenizer_source}: {err}") from None
    generator = Generator(model, pad_token_id=tokenizer.pad_id, stop_token_ids=tokenizer.stop_ids, mesh=mesh,
                          constraint=constraint)
    feature_mode = (meta.get("graph") or {}).get("feature_mode", "omnimol") if meta.get("graph") is not None else None
    return InferenceSession(model, meta, tokenizer, generator, feature_mode, checkpoint,
                            graph_tokens=bool(trained_with.get("graph_tokens", True)))


def number_median_decoder(session: InferenceSession, slots: int):
    """The median number decoder (inference/number_median.py) over the session's generator and tokenizer."""
    vocab_size = session.language_config.vocab_size
    try:
        number_tokens = number_tokens_for_tokenizer(session.tokenizer, vocab_size)
    except ValueError as err:
        raise SessionError(f"number-median decoding: {err}") from None
    return NumberMedianDecoder(session.generator, number_tokens, slots=slots)


def record_seed(seed: int, record_id: str) -> int:
    """A record's sampling stream: stable across runs, batchings and resumes."""
    digest = hashlib.blake2b(f"{seed}\x1f{record_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
