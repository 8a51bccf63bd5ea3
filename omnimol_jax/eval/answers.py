"""How each protocol reads a generated answer (docs/omnimol.md §9).

A prediction record keeps every answer in two forms:
    raw         the generated tokens decoded with special tokens kept, the stop token included: what the public
                evaluation's `tokenizer.decode(output_ids[prompt_length:])` returns (it runs one record per batch,
                so there is no padding), e.g. '[C][C][O]<|eot_id|>'
    prediction  special tokens dropped and surrounding whitespace stripped

reference  molecule and number tasks read the raw text before the first `<|eot_id|>` (the tokenizer's end-of-turn
           token: `<|im_end|>` for a ChatML model; every function takes it as `end_of_turn`), not stripped (public
           `pred.split(eos_token)[0]`: a leading space or a `<|end_of_text|>` stays in the answer); text tasks
           score the raw text as it is: ROUGE sees '<|eot_id|>' as the words 'eot id', while BLEU and METEOR drop
           `<|eot_id|>` pieces (public: filtered from `tokenizer.tokenize(...)`, the pad token being the same).
strict     the prediction.
Records written before the raw form was kept are read from their prediction in both protocols, and the report
says how many.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from omnimol_jax.eval.mol_metrics import PROTOCOL_REFERENCE, PROTOCOL_STRICT, check_protocol
from omnimol_jax.tasks import get_task

EOT = "<|eot_id|>"
TEXT_METRIC_SETS = ("caption", "procedure")
_SPECIAL_TOKEN = re.compile(r"(<\|[A-Za-z0-9_]+\|>)")



def conventions(protocol: str, end_of_turn: str = EOT) -> str:
    """How `protocol` reads and scores answers (Markdown, for the report's header)."""
    check_protocol(protocol)
    if protocol == PROTOCOL_STRICT:
        return ("answers decoded without special tokens and stripped; pieces kept whole; stereo kept; every record "
                "counts (an invalid molecule or unparseable number scores as a failure)")
    words = " ".join(w for w in re.split(r"[^A-Za-z0-9]+", end_of_turn) if w)
    return ("answers decoded with special tokens kept; molecule and number tasks read the text before the first "
            f"`{end_of_turn}`, not stripped; text tasks score the raw answer (`{end_of_turn}` included: ROUGE sees "
            f"'{words}', BLEU and METEOR drop `{end_of_turn}` pieces); pieces cut to 512 per text; molecules "
            "stereo-blind, averaged over valid ones; unparseable numbers skipped")


def is_text_task(task: str) -> bool:
    return get_task(task).metric_set in TEXT_METRIC_SETS


def reference_answer(task: str, raw: str, end_of_turn: str = EOT) -> str:
    """The answer the public evaluation scores for a raw decoded answer."""
    return raw if is_text_task(task) else raw.split(end_of_turn)[0]


def protocol_answer(task: str, answer: str, protocol: str, end_of_turn: str = EOT) -> str:
    """`answer` as `protocol` reads it (strict answers are already clean; reference ones may be raw)."""
    check_protocol(protocol)
    return reference_answer(task, answer, end_of_turn) if protocol == PROTOCOL_REFERENCE else answer


def record_answers(records: Sequence[Mapping[str, Any]], protocol: str) -> tuple[list[Any], int]:
    """Each record's answer for `protocol` ('raw' for reference, 'prediction' for strict) and how many
    records had no raw form (read from their prediction instead)."""
    check_protocol(protocol)
    if protocol == PROTOCOL_STRICT:
        return [r["prediction"] for r in records], 0
    answers = [r["raw"] if isinstance(r.get("raw"), str) else r["prediction"] for r in records]
    return answers, sum(not isinstance(r.get("raw"), str) for r in records)


def drop_eot_pieces(pieces: Sequence[str], end_of_turn: str = EOT) -> list[str]:
    return [piece for piece in pieces if piece != end_of_turn]


def split_special_tokens(text: str) -> list[str]:
    """Whitespace pieces with every `<|...|>` special token a piece of its own (the default tokenization when no
    model tokenizer is given, so that `<|eot_id|>` can be dropped as the public code drops it)."""
    return [piece for part in _SPECIAL_TOKEN.split(text) for piece in
            ([part] if _SPECIAL_TOKEN.fullmatch(part) else part.split())]
