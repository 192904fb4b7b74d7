"""The HH-RLHF dialogue format: splitting raw dialogues, normalising prompts, rendering chat messages.

Anthropic's HH-RLHF (Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF") stores each
preference as two full dialogues that share every turn but the last assistant reply:

    "\\n\\nHuman: How far can spiders jump?\\n\\nAssistant: About a metre."

Everything in EdgeRLHF speaks this format. A *prompt* is the dialogue up to and including the final
`"\\n\\nAssistant:"`; a *response* is the text of that final assistant turn, stripped. A model sees
`prompt + " " + response` (`join`), and generation stops at `STOP_STRING` (the model starting the
next human turn) or at the tokenizer's EOS token.
"""

from __future__ import annotations

from collections.abc import Iterable

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
