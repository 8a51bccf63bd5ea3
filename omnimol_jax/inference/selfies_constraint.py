"""SELFIES-constrained decoding: a token automaton that keeps a generated answer a sequence of SELFIES symbols.

Language. An answer is one or more molecules separated by '.', each molecule a sequence of symbols from a
fixed alphabet that starts with an atom symbol (not a branch or ring symbol), and ends with the stop token:

    answer   := molecule ('.' molecule)* STOP
    molecule := ATOM (ATOM | BRANCH | RING)*

The default alphabet is SELFIES' semantically robust alphabet plus the tetrahedral-carbon and directional
single-bond variants that stereo-aware data uses ([C@@H1], [/C], [\\N], ...). SELFIES' grammar guarantees that
every sequence of these symbols decodes to a valid molecule (symbols outside its valence table would get a
default capacity of 8 and could break that, so they are left out), and starting each molecule with an atom keeps
every '.'-component non-empty, so every accepted answer parses in RDKit with at least one atom.

Tokens need not align with symbols (Llama 3's tokenizer splits "[=C]" into pieces such as "[", "=C", "]"), so the
automaton runs over characters: a state is (prefix of the symbol being written, whether the current molecule
already has an atom). A token is allowed in a state when its decoded text can be read character by character
without leaving the language and without entering a dead state (a symbol prefix that can only complete into a
branch/ring symbol while the molecule has no atom yet), and when the state it leads to can still be completed
with the vocabulary's tokens (so decoding never gets stuck). Tokens whose text has characters outside the
alphabet, an empty text, or special tokens are never allowed. The stop token is allowed only between symbols once the
current molecule has an atom.

Tables for the device (built once per tokenizer on the host, ~S x C int32 where C counts the tokens allowed
somewhere, usually a few hundred to a few thousand):
    transitions [S, C]   next state after candidate token c, -1 when c is not allowed in that state
    candidate_ids [C]    vocabulary id of each candidate
    token_candidate [V]  candidate index of each vocabulary id, -1 for non-candidates
    accepting [S]        the stop token is allowed (a complete answer so far)
The decoding loop scatters `transitions[state] >= 0` into a [V] mask, adds the stop tokens when accepting, and
moves every row to its next state after sampling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np

START_STATE = 0  # ("", molecule has no atom yet)

_CHIRAL_CARBONS = ("[C@H1]", "[C@@H1]", "[C@]", "[C@@]")


def default_selfies_alphabet() -> tuple[str, ...]:
    """The robust SELFIES alphabet plus chiral carbons and '/' '\\' single-bond variants of single-bonded atoms."""
    import selfies  # local: only constrained decoding needs it

    symbols = set(selfies.get_semantic_robust_alphabet()) | set(_CHIRAL_CARBONS)
    single_bonded_atoms = [s for s in symbols if not is_structure_symbol(s) and s[1] not in "=#/\\"]
    for atom in single_bonded_atoms:
        symbols.add(f"[/{atom[1:]}")
        symbols.add(f"[\\{atom[1:]}")
    return tuple(sorted(symbols))


def is_structure_symbol(symbol: str) -> bool:
    """Branch and ring symbols: they need an atom before them to mean anything."""
    return "Branch" in symbol or "Ring" in symbol


@dataclasses.dataclass(frozen=True)
class SelfiesConstraint:
    """Host-side tables of the automaton (see the module docstring); `device_tables()` gives the jax arrays."""

    transitions: np.ndarray  # int32 [S, C]
    candidate_ids: np.ndarray  # int32 [C]
    token_candidate: np.ndarray  # int32 [V]
    accepting: np.ndarray  # bool [S]
    state_names: tuple[str, ...]  # "prefix|0" / "prefix|1", for debugging and tests
    alphabet: tuple[str, ...]

    @property
    def num_states(self) -> int:
        return int(self.transitions.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.token_candidate.shape[0])

    def device_tables(self) -> "ConstraintTables":
        import jax.numpy as jnp

        return ConstraintTables(jnp.asarray(self.transitions), jnp.asarray(self.candidate_ids),
                                jnp.asarray(self.token_candidate), jnp.asarray(self.accepting))

    def allowed_ids(self, state: int) -> np.ndarray:
        return self.candidate_ids[self.transitions[state] >= 0]

    def step(self, state: int, token_id: int) -> int:
        """Next state after `token_id` (-1: not allowed). Host-side mirror of the device transition."""
        candidate = int(self.token_candidate[token_id])
        return -1 if candidate < 0 else int(self.transitions[state, candidate])


class ConstraintTables(NamedTuple):
    """The automaton's tables as device arrays (a pytree, passed into the jitted decoder)."""

    transitions: Any  # int32 [S, C]
    candidate_ids: Any  # int32 [C]
    token_candidate: Any  # int32 [V]
    accepting: Any  # bool [S]


class _Automaton:
    """Character-level automaton over (symbol prefix, molecule-has-atom) states."""

    def __init__(self, alphabet: Sequence[str]):
        bad = [s for s in alphabet if not (len(s) >= 3 and s[0] == "[" and s[-1] == "]" and "[" not in s[1:-1]
                                            and "]" not in s[1:-1] and "." not in s)]
        if bad:
            raise ValueError(f"not SELFIES symbols of the form '[...]': {bad[:10]}")
        self.symbols = frozenset(alphabet)
        self.atoms = frozenset(s for s in alphabet if not is_structure_symbol(s))
        prefixes = {s[:i] for s in alphabet for i in range(1, len(s))}
        atom_prefixes = {s[:i] for s in self.atoms for i in range(1, len(s))}
        # States: the empty prefix (between symbols) and every proper prefix, each with the has-atom flag;
        # (prefix, no atom) lives only if some atom symbol continues the prefix.
        names: list[tuple[str, bool]] = [("", False), ("", True)]
        names += [(p, False) for p in sorted(atom_prefixes)] + [(p, True) for p in sorted(prefixes)]
        self.states = names
        self.index = {name: i for i, name in enumerate(names)}
        self.charset = frozenset("".join(alphabet)) | {"."}
        self._char_cache: dict[tuple[int, str], int] = {}

    def char_step(self, state: int, char: str) -> int:
        key = (state, char)
        cached = self._char_cache.get(key)
        if cached is None:
            cached = self._char_step(state, char)
            self._char_cache[key] = cached
        return cached

    def _char_step(self, state: int, char: str) -> int:
        prefix, has_atom = self.states[state]
        if prefix == "":
            if char == ".":
                return self.index[("", False)] if has_atom else -1
            return self.index.get(("[", has_atom), -1) if char == "[" else -1
        extended = prefix + char
        if extended in self.symbols:
            if extended in self.atoms:
                return self.index[("", True)]
            return self.index[("", True)] if has_atom else -1
        return self.index.get((extended, has_atom), -1)

    def walk(self, state: int, text: str) -> int:
        for char in text:
            state = self.char_step(state, char)
            if state < 0:
                return -1
        return state


def build_selfies_constraint(token_texts: Sequence[Optional[str]], alphabet: Optional[Iterable[str]] = None,
                             ) -> SelfiesConstraint:
    """Tables for a vocabulary given as the decoded text of every token id (None for special tokens).

    The text of a token must be what it contributes to a decoded sequence (true for byte-level BPE such as
    Llama 3's and the built-in tokenizer, where decode(ids) is the concatenation of the tokens' texts).
    """
    automaton = _Automaton(tuple(alphabet) if alphabet is not None else default_selfies_alphabet())
    num_states = len(automaton.states)
    # Group states by the characters they accept, so each token is only walked from plausible starts.
    starts_by_char: dict[str, list[int]] = {}
    for char in automaton.charset:
        starts_by_char[char] = [s for s in range(num_states) if automaton.char_step(s, char) >= 0]
    candidate_ids: list[int] = []
    columns: list[np.ndarray] = []
    for token_id, text in enumerate(token_texts):
        if not text or not set(text) <= automaton.charset:
            continue
        column = np.full((num_states,), -1, np.int32)
        for state in starts_by_char[text[0]]:
            column[state] = automaton.walk(state, text)
        if (column >= 0).any():
            candidate_ids.append(token_id)
            columns.append(column)
    if not candidate_ids:
        raise ValueError("no token of the vocabulary can write a SELFIES symbol; constrained decoding needs a "
                         "tokenizer whose tokens cover '[', ']' and the symbol characters")
    transitions = np.stack(columns, axis=1)
    accepting = np.array([prefix == "" and has_atom for prefix, has_atom in automaton.states])
    transitions = _prune_unproductive(transitions, accepting)
    keep = (transitions >= 0).any(axis=0)
    transitions = transitions[:, keep]
    candidate_ids = [token_id for token_id, kept in zip(candidate_ids, keep) if kept]
    if not candidate_ids or not (transitions[START_STATE] >= 0).any():
        raise ValueError("the vocabulary cannot write a complete SELFIES molecule")
    token_candidate = np.full((len(token_texts),), -1, np.int32)
    token_candidate[candidate_ids] = np.arange(len(candidate_ids), dtype=np.int32)
    names = tuple(f"{prefix}|{int(has_atom)}" for prefix, has_atom in automaton.states)
    return SelfiesConstraint(transitions, np.asarray(candidate_ids, np.int32), token_candidate, accepting, names,
                             tuple(sorted(automaton.symbols)))


def _prune_unproductive(transitions: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """Disallows transitions into states from which no sequence of the vocabulary's tokens reaches an accepting
    state (a symbol prefix whose completion needs characters no token has): decoding can then never get stuck."""
    productive = accepting.copy()
    while True:
        reaches = ((transitions >= 0) & productive[np.maximum(transitions, 0)]).any(axis=1)
        grown = productive | reaches
        if (grown == productive).all():
            break
        productive = grown
    return np.where((transitions >= 0) & productive[np.maximum(transitions, 0)], transitions, -1).astype(np.int32)


def token_texts_of(decode_one: Callable[[int], str], vocab_size: int, special_ids: Iterable[int] = ()) -> list:
    """The decoded text of every id in [0, vocab_size) (None for special ids and ids the tokenizer lacks)."""
    special = set(int(i) for i in special_ids)
    texts: list[Optional[str]] = []
    for token_id in range(vocab_size):
        if token_id in special:
            texts.append(None)
            continue
        try:
            texts.append(decode_one(token_id))
        except Exception:  # ids beyond a tokenizer's vocabulary (model vocab padded larger) decode to nothing
            texts.append(None)
    return texts


def tokenizer_token_texts(tokenizer, vocab_size: int) -> list:
    """Decoded text of each id of a model vocabulary of `vocab_size` for an `omnimol_jax.data.tokenizer.ChatTokenizer`
    (None for its special `<|...|>` tokens and for ids past the tokenizer's vocabulary)."""
    raw = tokenizer.tokenizer
    special = {i for i in range(min(vocab_size, raw.get_vocab_size(with_added_tokens=True)))
               if (tok := raw.id_to_token(i)) is not None and tok.startswith("<|") and tok.endswith("|>")}
    known = raw.get_vocab_size(with_added_tokens=True)

    def decode_one(token_id: int) -> str:
        if token_id >= known:
            raise IndexError(token_id)
        return raw.decode([token_id], skip_special_tokens=False)

    return token_texts_of(decode_one, vocab_size, special)


def constraint_for_tokenizer(tokenizer, vocab_size: int, alphabet: Optional[Iterable[str]] = None,
                             ) -> SelfiesConstraint:
    """Tables for an `omnimol_jax.data.tokenizer.ChatTokenizer` over a model vocabulary of `vocab_size` ids."""
    return build_selfies_constraint(tokenizer_token_texts(tokenizer, vocab_size), alphabet)
