"""The HH-RLHF dialogue format, and how a model sees a dialogue (`PromptFormat`: HH text or a chat template).

Anthropic's HH-RLHF (Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF") stores each
preference as two full dialogues that share every turn but the last assistant reply:

    "\\n\\nHuman: How far can spiders jump?\\n\\nAssistant: About a metre."

Everything in EdgeRLHF speaks this format. A *prompt* is the dialogue up to and including the final
`"\\n\\nAssistant:"`; a *response* is the text of that final assistant turn, stripped. A model sees
`prompt + " " + response` (`join`), and generation stops at `STOP_STRING` (the model starting the
next human turn) or at the tokenizer's EOS token.

Data is stored in this format whatever the model. A model whose tokenizer has a chat template sees the
same dialogue through that template instead (`PromptFormat`): the turns become messages
(`to_messages`), the prompt is `apply_chat_template(messages, add_generation_prompt=True)`, a response
ends with the template's end-of-turn text, and generation stops at its end-of-turn token(s).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

HUMAN = "\n\nHuman:"
"""Marker that opens a human turn."""
ASSISTANT = "\n\nAssistant:"
"""Marker that opens an assistant turn; every prompt ends with it."""
STOP_STRING = HUMAN
"""Generation stops when the model starts the next human turn."""
STOP_STRINGS = (HUMAN, ASSISTANT)
"""Every marker that ends a generated response (a model may also start a new assistant turn)."""


class DialogueError(ValueError):
    """A text is not a dialogue in the HH-RLHF format (e.g. it has no assistant turn)."""


def split_dialogue(text: str) -> tuple[str, str]:
    """Split a full HH dialogue into (prompt, response) at its last assistant turn.

    The prompt keeps everything up to and including the last `"\\n\\nAssistant:"` (normalised to start
    with `"\\n\\nHuman:"`); the response is the rest, stripped of surrounding whitespace. Raises
    `DialogueError` when the text has no assistant turn or no human turn before it.

    >>> split_dialogue("\\n\\nHuman: Hi\\n\\nAssistant: Hello there.")
    ('\\n\\nHuman: Hi\\n\\nAssistant:', 'Hello there.')
    """
    if not isinstance(text, str):
        raise DialogueError(f"expected a string, got {type(text).__name__}")
    # A few raw files drop the leading blank line; put it back so the marker search is uniform.
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DialogueError("no '\\n\\nAssistant:' turn in the dialogue")
    prompt = text[: cut + len(ASSISTANT)]
    if HUMAN not in prompt:
        raise DialogueError("no '\\n\\nHuman:' turn before the last assistant turn")
    return prompt, text[cut + len(ASSISTANT):].strip()


def normalize_prompt(prompt: str) -> str:
    """Bring a prompt into the canonical form: starts with `"\\n\\nHuman:"`, ends with `"\\n\\nAssistant:"`.

    Processed HH exports write `"Human: ...\\n\\nAssistant: ...\\n\\nHuman: last question"`, without the
    leading blank line and without the trailing assistant marker; canonical prompts pass unchanged.

    >>> normalize_prompt("Human: Hi")
    '\\n\\nHuman: Hi\\n\\nAssistant:'
    """
    text = prompt.strip()
    if not text:
        raise DialogueError("empty prompt")
    text = "\n\n" + text
    if not text.startswith(HUMAN):
        raise DialogueError("prompt does not start with a 'Human:' turn")
    if not text.endswith(ASSISTANT):
        text = text + ASSISTANT
    return text


def join(prompt: str, response: str) -> str:
    """The full text a model sees: `prompt + " " + response` (the space follows `Assistant:`)."""
    return prompt + " " + response


class StopRule:
    """Where a response ends: at its first EOS token or at the first of `stops` in its text.

    The stops are the HH turn markers (`STOP_STRINGS`: the model opening the next turn)
    unless given; the chat adds a request's own `stop` strings. EOS is a token, so the loops that see
    tokens check it themselves; this class answers the text side, for every generator: `StopOnMarkers`
    during `generate`, `response_lengths` after it, and the chat's streaming `StopScanner` token by token.
    """

    def __init__(self, stops: Iterable[str] = STOP_STRINGS):
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)

    def find(self, text: str) -> int:
        """Where the first stop string in `text` begins; -1 when there is none."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def cut(self, text: str) -> str:
        """`text` up to its first stop string (not stripped: a stream keeps what it already showed)."""
        end = self.find(text)
        return text if end < 0 else text[:end]

    def pending(self, text: str) -> int:
        """How many characters at the end of `text` could still grow into a stop string (the longest
        suffix that is a proper prefix of one); a stream holds them back until the next token decides."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held


def cut_at_stop(text: str) -> str:
    """A generated continuation cut before the first stop marker, stripped.

    >>> cut_at_stop(" Sure thing.\\n\\nHuman: thanks")
    'Sure thing.'
    """
    return StopRule().cut(text).strip()


def _clean_content(content: str) -> str:
    # A message must not be able to forge a turn: blank-line role markers inside it become plain text.
    text = content.strip()
    for marker in STOP_STRINGS:
        text = text.replace(marker, "\n" + marker[2:])
    return text


def render_chat(messages: list[dict[str, str]]) -> str:
    """Render OpenAI-style messages as an HH prompt ending with `"\\n\\nAssistant:"`.

    `user` messages become `Human:` turns and `assistant` messages `Assistant:` turns. HH-RLHF has no
    system role, so system messages are placed, in order, as `"\\n\\nSystem: ..."` lines where they occur.
    Role markers inside a message's content are defused (`"\\n\\nHuman:"` -> `"\\nHuman:"`), so a user
    cannot forge a turn. Raises `DialogueError` for an unknown role, a non-string content, or no user
    message at all.

    >>> render_chat([{"role": "user", "content": "Hi"}])
    '\\n\\nHuman: Hi\\n\\nAssistant:'
    """
    if not messages:
        raise DialogueError("no messages")
    labels = {"user": "Human", "assistant": "Assistant", "system": "System"}
    parts = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in labels:
            raise DialogueError(f"message {i}: unknown role {role!r}; expected user, assistant or system")
        if not isinstance(content, str):
            raise DialogueError(f"message {i}: content must be a string")
        text = _clean_content(content)
        parts.append(f"\n\n{labels[role]}:" + (f" {text}" if text else ""))
    if not any(m.get("role") == "user" for m in messages):
        raise DialogueError("at least one user message is needed")
    return "".join(parts) + ASSISTANT


HH_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '\n\nHuman:' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\n\nAssistant:' }}"
    "{%- else -%}{{ '\n\nSystem:' }}{%- endif -%}"
    "{%- set text = message['content'] | trim | replace('\n\nHuman:', '\nHuman:')"
    " | replace('\n\nAssistant:', '\nAssistant:') -%}"
    "{%- if text -%}{{ ' ' + text }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)
"""`render_chat` as a Jinja chat template, for tools outside EdgeRLHF that run a model trained on HH text (a GGUF
export's `tokenizer.chat_template`): the same prompt for the same user, assistant and system messages."""

_TURN = re.compile(r"\n\n(Human|Assistant|System):")
_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


def to_messages(prompt: str) -> list[dict[str, str]]:
    """An HH prompt as OpenAI-style messages, without its final (empty) assistant turn: the inverse of
    `render_chat`.

    >>> to_messages("\\n\\nHuman: Hi\\n\\nAssistant: Hello.\\n\\nHuman: Bye\\n\\nAssistant:")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'}]
    """
    parts = _TURN.split(normalize_prompt(prompt))  # ["", role, text, role, text, ...]
    messages = [{"role": _ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    return messages[:-1]  # the prompt ends with the assistant turn still to be written


TEMPLATE_PROBE = "EDGERLHF-END-OF-TURN-PROBE"
"""An answer rendered through a chat template to find what the template writes after an assistant turn."""


@dataclass(frozen=True)
class PromptFormat:
    """How one tokenizer's model sees a dialogue: the raw HH text, or the tokenizer's chat template.

    The one place every stage, the evaluation, the probes and the chat turn a stored HH prompt and
    response into model text (`PromptFormat.of(tokenizer)`):

                      HH text (no template)              chat template
        prompt(p)     p  ("...\\n\\nAssistant:")          apply_chat_template(to_messages(p), add_generation_prompt)
        answer(r)     " " + r + EOS  (SFT's target)      r + end_of_turn  (e.g. "<|im_end|>\\n")
        scored(p, r)  p + " " + r  (the reward's input)  prompt(p) + r
        stops         EOS and the HH turn markers        EOS and the end-of-turn token(s)

    The reward reads the last token of `scored`, the response's own last token in both formats (no
    end-of-turn or EOS: a tokenizer whose pad token is its EOS would hide that token from the
    sequence classifier the reward model is trained as). Template text already holds its special tokens
    (a BOS), so it is tokenized with `add_special_tokens=False`.
    """

    tokenizer: object = field(repr=False)
    chat_template: bool
    end_of_turn: str
    """What the template writes after an assistant's answer ("" without a template)."""
    stop_token_ids: tuple[int, ...]
    """Token ids that end a response: EOS and the special tokens of `end_of_turn`."""
    stop_strings: tuple[str, ...]
    """Texts that end a response: the HH turn markers without a template; none with one (its turn ends with a token)."""

    @classmethod
    def of(cls, tokenizer) -> PromptFormat:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        if not getattr(tokenizer, "chat_template", None):
            return cls(tokenizer, False, "", tuple(eos), STOP_STRINGS)
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": TEMPLATE_PROBE}]
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
        end_of_turn = rendered[rendered.rindex(TEMPLATE_PROBE) + len(TEMPLATE_PROBE):]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        turn_ids = [i for i in tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if i in special]
        return cls(tokenizer, True, end_of_turn, tuple(dict.fromkeys(eos + turn_ids)), ())

    @property
    def add_special_tokens(self) -> bool:
        """Whether tokenizing this format's text should add the tokenizer's own special tokens (a BOS)."""
        return not self.chat_template

    def prompt(self, prompt: str) -> str:
        """The model text of a stored HH prompt, ending where the assistant's answer begins."""
        if not self.chat_template:
            return prompt
        return self._apply(to_messages(prompt))

    def answer(self, response: str) -> str:
        """The text SFT teaches after `prompt(p)`: the response and the end of the turn."""
        if not self.chat_template:
            return " " + response + (self.tokenizer.eos_token or "")
        return response + self.end_of_turn

    def scored(self, prompt: str, response: str) -> str:
        """The text a reward model scores (its last token is the response's last token)."""
        return join(prompt, response) if not self.chat_template else self.prompt(prompt) + response

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The model text of OpenAI-style chat messages, ending where the assistant's answer begins.

        Raises `DialogueError` as `render_chat` does. With a template, the special tokens' texts are
        removed from message contents, so a user cannot forge a turn (as `render_chat` defuses markers).
        """
        prompt = render_chat(messages)  # validates roles and contents, defuses HH markers
        if not self.chat_template:
            return prompt
        specials = [t for t in self.tokenizer.all_special_tokens if t] + \
            [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        clean = []
        for m in messages:
            content = m["content"]
            for token in specials:
                content = content.replace(token, "")
            clean.append({"role": m["role"], "content": content.strip()})
        return self._apply(clean)

    def _apply(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's TemplateError: e.g. a template that refuses system messages
            raise DialogueError(f"the model's chat template refused these messages: {exc}") from exc

    def stop_rule(self, extra: Iterable[str] = ()) -> StopRule:
        """The text side of where a response ends: this format's stop strings and `extra` (a request's own)."""
        return StopRule((*self.stop_strings, *extra))
