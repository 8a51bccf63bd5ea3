"""How one conversation (system, user, answer) becomes text: the frame of a chat format.

Every chat template the project can train on renders a one-turn conversation as

    prefix + system + after_system + user + after_user + answer + suffix

where the five frame strings do not depend on the message texts, `prefix + ... + after_user` is exactly the
generation prompt (`add_generation_prompt=True`), and `suffix` starts with the token that ends the assistant turn
(`<|eot_id|>`, `<|im_end|>`, `</s>`): the last supervised token and the stop token of generation.

Two sources:
- `LLAMA3_OMNIMOL`: the Llama-3 conversation of the public Omni-Mol code (docs/omnimol.md §5), which the released
  checkpoints saw. Llama-3 tokenizers use it by default: a Meta Llama-3.2 folder's own template adds a date
  header that the Omni-Mol models never saw. The built-in and `build-tokenizer --llama3` folders carry a template
  that renders exactly this frame.
- `frame_from_template(...)`: any other tokenizer's Jinja chat template, rendered through transformers'
  `apply_chat_template` with sentinel messages. A template whose rendering depends on the message texts in any
  other way (it trims them, drops the system turn, writes nothing after the answer) cannot be split into a
  prompt and a supervised answer: `ChatFormatError` names the tokenizer and what failed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from omnimol_jax.config import CHAT_FORMATS
from omnimol_jax.errors import InputError

LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOT = "<|eot_id|>"
_LLAMA3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"

# Message texts that no template writes by itself; the second set checks that surrounding whitespace and newlines
# reach the rendered text untouched (a template that trims would change the model's input).
_SENTINELS = (("\u2460system\u2460", "\u2461user\u2461", "\u2462answer\u2462"),
              ("  \u2463sys\n", "\n\u2464user ", " \u2465answer\n\n"))


class ChatFormatError(InputError):
    """A tokenizer's chat template cannot be split into prompt and answer (the message names the tokenizer)."""


@dataclasses.dataclass(frozen=True)
class ChatFrame:
    """The text around the messages of one conversation (see the module docstring)."""

    name: str               # "llama3-omnimol" or "template"
    prefix: str
    after_system: str       # "" with has_system False
    after_user: str
    suffix: str
    end_of_turn: str        # the special token `suffix` starts with
    has_system: bool = True

    def prompt(self, system: str, user: str) -> str:
        """The generation prompt: everything up to where the answer starts."""
        head = self.prefix + (system + self.after_system if self.has_system else "")
        return head + user + self.after_user

    def conversation(self, system: str, user: str, answer: str) -> tuple[str, int, int]:
        """(text, answer start, end of the supervised span): the answer and its end-of-turn token are supervised,
        anything the template writes after that token is not."""
        prompt = self.prompt(system, user)
        start = len(prompt)
        return prompt + answer + self.suffix, start, start + len(answer) + len(self.end_of_turn)


LLAMA3_OMNIMOL = ChatFrame(
    name="llama3-omnimol", prefix=LLAMA3_BOS + _LLAMA3_HEADER.format("system"),
    after_system=LLAMA3_EOT + _LLAMA3_HEADER.format("user"),
    after_user=LLAMA3_EOT + _LLAMA3_HEADER.format("assistant"), suffix=LLAMA3_EOT, end_of_turn=LLAMA3_EOT)

# The same frame as a Jinja chat template, written into the tokenizer folders the project builds, so that
# transformers' apply_chat_template renders what training sees.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def _messages(system: Optional[str], user: str, answer: Optional[str]) -> list[dict]:
    out = [{"role": "system", "content": system}] if system is not None else []
    out.append({"role": "user", "content": user})
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out


def _split(text: str, pieces: Sequence[str]) -> Optional[list[str]]:
    """The text between and around `pieces`, each found exactly once and in order; None otherwise."""
    between, rest = [], text
    for piece in pieces:
        if text.count(piece) != 1 or piece not in rest:
            return None
        head, rest = rest.split(piece, 1)
        between.append(head)
    return between + [rest]


def _frame_with(render: Render, with_system: bool, special_tokens: Sequence[str], source: str) -> ChatFrame:
    system, user, answer = _SENTINELS[0]
    full = render(_messages(system if with_system else None, user, answer), False)
    parts = _split(full, (system, user, answer) if with_system else (user, answer))
    if parts is None:
        raise ChatFormatError(f"tokenizer {source}: its chat template does not write each message once, in order "
                              f"(rendered {full[:200]!r})")
    if with_system:
        prefix, after_system, after_user, suffix = parts[0], parts[1], parts[2], parts[3]
    else:
        prefix, after_system, after_user, suffix = parts[0], "", parts[1], parts[2]
    ends = sorted((t for t in special_tokens if t and suffix.startswith(t)), key=len)
    if not ends:
        raise ChatFormatError(f"tokenizer {source}: its chat template writes no special token right after the "
                              f"assistant's answer (it writes {suffix[:40]!r}), so nothing marks where an answer ends")
    frame = ChatFrame("template", prefix, after_system, after_user, suffix, ends[-1], has_system=with_system)
    for system, user, answer in _SENTINELS:
        if not with_system:
            system = None
        expected_prompt = frame.prompt(system or "", user)
        got_full = render(_messages(system, user, answer), False)
        got_prompt = render(_messages(system, user, None), True)
        if got_full != expected_prompt + answer + suffix:
            raise ChatFormatError(f"tokenizer {source}: its chat template changes the message texts (e.g. strips "
                                  f"whitespace): {got_full[:200]!r}")
        if got_prompt != expected_prompt:
            raise ChatFormatError(f"tokenizer {source}: its generation prompt ({got_prompt[-60:]!r}) is not the "
                                  f"conversation's text up to the answer ({expected_prompt[-60:]!r})")
    return frame


def frame_from_template(render: Render, special_tokens: Sequence[str], source: str) -> ChatFrame:
    """The frame of a chat template, given a renderer (transformers' apply_chat_template with tokenize=False).

    A system turn is used when the template renders one; a template that refuses system messages (it raises) or
    drops them gets a frame without one."""
    try:
        return _frame_with(render, True, special_tokens, source)
    except ChatFormatError as err:
        first = err
    except Exception:  # noqa: BLE001 - a template may raise anything (raise_exception) on a system turn
        first = None
    try:
        return _frame_with(render, False, special_tokens, source)
    except ChatFormatError:
        if first is not None:
            raise first from None
        raise
    except Exception as err:  # noqa: BLE001
        raise ChatFormatError(f"tokenizer {source}: its chat template fails on a system/user/assistant "
                              f"conversation: {type(err).__name__}: {err}") from None


def hf_template_renderer(folder: Any, source: str) -> tuple[Render, list[str]]:
    """(renderer, special token strings) of a HF tokenizer folder, through transformers' own apply_chat_template."""
    from transformers import AutoTokenizer  # local: transformers is slow to import

    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds on a bad folder
        raise ChatFormatError(f"tokenizer {source}: transformers cannot load it: {err}") from None
    if not getattr(hf, "chat_template", None):
        raise ChatFormatError(f"tokenizer {source} has no chat template (tokenizer_config.json / chat_template.jinja); "
                              "a Llama-3 tokenizer can use data.chat_format=llama3")

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    specials = set(hf.all_special_tokens)
    specials.update(str(t) for t in getattr(hf, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return render, sorted(specials)
