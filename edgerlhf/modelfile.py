"""The Ollama side of a GGUF export: a Modelfile (the chat template as an Ollama template, the stop strings, the job's
sampling defaults) and a README of the commands that run the file in Ollama, llama.cpp and LM Studio.

Ollama does not run a model's Jinja chat template: a Modelfile's TEMPLATE is a Go template over `.Messages`
(https://github.com/ollama/ollama/blob/main/docs/template.md). `turn_template` reads one out of the Jinja template by
rendering marked messages through it (what each role's turn writes before and after its content, what opens the
answer, a default system prompt) and keeps it only when it renders probe conversations exactly as the Jinja
template does. A template it cannot reproduce (one that writes today's date, or folds the system prompt into the
first user turn) gets no TEMPLATE line: Ollama then picks one from the chat template stored in the GGUF file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MARKS = {role: f"EDGERLHFMARK{role.upper()}{i}" for i, role in enumerate(ROLES)}

Render = Callable[[list[dict[str, str]], bool], str]
"""Messages, add_generation_prompt -> the prompt text (a Jinja chat template applied)."""


@dataclass(frozen=True)
class TurnTemplate:
    """A chat template as text around each message: what an Ollama template can say."""

    preamble: str
    """Written once before the first message (a BOS the tokenizer does not add itself)."""
    prefix: dict[str, str]
    """Role -> text before the message's content; a role missing here is dropped (a template without a system
    turn)."""
    suffix: dict[str, str]
    """Role -> text after the content."""
    generation: str
    """Written after the last message: where the assistant's answer begins."""
    default_system: str | None = None
    """The system prompt the template writes when a conversation has none (Ollama's SYSTEM, which Ollama adds as
    the first message of a conversation that has no system message)."""

    def render(self, messages: list[dict[str, str]]) -> str:
        """What Ollama renders for `messages` with the Modelfile of this template."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        turns = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
                        for m in messages if m["role"] in self.prefix)
        return self.preamble + turns + self.generation

    def go_template(self) -> str:
        """The Ollama (Go) template: every literal as a quoted string action, so no text of the model's template
        is read as template syntax."""
        def text(s: str) -> str:
            return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""

        branches = "".join(f"{{{{ {'if' if i == 0 else 'else if'} eq .Role \"{role}\" }}}}"
                           f"{text(self.prefix[role])}{{{{ .Content }}}}{text(self.suffix[role])}"
                           for i, role in enumerate(r for r in ROLES if r in self.prefix))
        return f"{text(self.preamble)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}" \
               f"{text(self.generation)}"


def _around(text: str, marks: list[str]) -> list[str] | None:
    """The pieces of `text` between the marks, in order (None when a mark is missing or out of order)."""
    pieces, rest = [], text
    for mark in marks:
        if mark not in rest:
            return None
        before, rest = rest.split(mark, 1)
        pieces.append(before)
    return [*pieces, rest]


def _strip(text: str, start: str = "", end: str = "") -> str | None:
    """`text` without `start` and `end`, None when it does not begin and end with them."""
    if not (text.startswith(start) and text.endswith(end)) or len(start) + len(end) > len(text):
        return None
    return text[len(start):len(text) - len(end)]


def _derive(render: Render, bos_text: str) -> TurnTemplate | None:
    """Read the text around each role's content off renders of marked messages: a user turn alone, with and without
    the generation prompt, a user-assistant-user talk, and a system turn before a user turn. None where the pieces do
    not add up to turns (`turn_template` then checks what they render)."""
    u, a, s = ({"role": r, "content": MARKS[r]} for r in ("user", "assistant", "system"))
    u2 = {"role": "user", "content": MARKS["user"] + "X"}
    alone = _around(render([u], False), [MARKS["user"]])
    asking = _around(render([u], True), [MARKS["user"]])
    talk = _around(render([u, a, u2], True), [MARKS["user"], MARKS["assistant"], u2["content"]])
    answered = _around(render([u, a], False), [MARKS["user"], MARKS["assistant"]])
    if None in (alone, asking, talk, answered):
        return None
    user_suffix = alone[1]
    generation = _strip(asking[1], user_suffix)
    assistant_prefix = _strip(talk[1], user_suffix)
    assistant_suffix = answered[2]
    user_prefix = _strip(talk[2], assistant_suffix)
    if None in (generation, assistant_prefix, user_prefix) or _strip(talk[3], user_suffix + generation) != "":
        return None
    head = _strip(talk[0], "", user_prefix)
    if head is None or not head.startswith(bos_text):
        return None
    preamble, default_block = bos_text, head[len(bos_text):]
    prefix = {"user": user_prefix, "assistant": assistant_prefix}
    suffix = {"user": user_suffix, "assistant": assistant_suffix}
    try:
        with_system = _around(render([s, u], True), [MARKS["system"], MARKS["user"]])
    except Exception:  # a template that refuses a system message: Ollama's are dropped
        with_system = None
    default_system = None
    if with_system is not None:
        if not with_system[0].startswith(preamble):
            return None
        prefix["system"] = with_system[0][len(preamble):]
        suffix["system"] = _strip(with_system[1], "", user_prefix)
        if suffix["system"] is None:
            return None
        if default_block:
            default_system = _strip(default_block, prefix["system"], suffix["system"])
            if default_system is None:
                return None
    elif default_block:
        return None
    return TurnTemplate(preamble, prefix, suffix, generation, default_system)


PROBES = (
    [{"role": "user", "content": "How far can spiders jump?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "How far can spiders jump?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How far can spiders jump?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}],
)
"""Conversations an Ollama template must render exactly as the Jinja template (the system ones only when it has a
system turn)."""


def turn_template(render: Render, bos_text: str = "") -> TurnTemplate | None:
    """The chat template behind `render` as a `TurnTemplate`, or None when no such template renders `PROBES` as it
    does. `bos_text`: the BOS the tokenizer adds itself, left out of the template (Ollama's tokenizer adds it too)."""
    try:
        turns = _derive(render, bos_text)
        if turns is None:
            return None
        if '"""' in (turns.default_system or ""):
            return None  # a Modelfile value cannot hold it
        for messages in PROBES:
            if messages[0]["role"] == "system" and "system" not in turns.prefix:
                continue
            rendered = render(messages, True)
            if not rendered.startswith(bos_text) or turns.render(messages) != rendered[len(bos_text):]:
                return None
    except Exception:  # jinja's TemplateError: a template that refuses a probe cannot be written for Ollama
        return None
    return turns


# --- the files ---------------------------------------------------------------------------------------------------

def modelfile_value(value: str) -> str:
    """`value` quoted as Ollama's Modelfile parser reads it back (`parser.go`: no escapes; triple quotes when the
    value holds a quote)."""
    if '"""' in value:
        raise ValueError(f"a Modelfile value cannot hold three quotes in a row: {value!r}")
    return f'"""{value}"""' if '"' in value else f'"{value}"'


OLLAMA_NUM_CTX = 4096
"""Ollama's default context (tokens); a model trained on fewer positions gets its own length instead."""


def modelfile(gguf_name: str, turns: TurnTemplate | None, stops: list[str], sampling: dict[str, float],
              context_length: int) -> str:
    """The Modelfile of a GGUF export: `ollama create NAME -f Modelfile` beside the file."""
    lines = ["# Ollama Modelfile (written by edgerlhf export): ollama create <name> -f Modelfile",
             f"FROM ./{gguf_name}"]
    if turns is not None:
        lines.append(f"TEMPLATE {modelfile_value(turns.go_template())}")
        if turns.default_system:
            lines.append(f"SYSTEM {modelfile_value(turns.default_system)}")
    else:
        lines.append("# No TEMPLATE: this model's chat template cannot be written as an Ollama template; Ollama picks "
                     "one from the chat template inside the GGUF file.")
    lines += [f"PARAMETER stop {modelfile_value(stop)}" for stop in dict.fromkeys(stops) if stop and '"""' not in stop]
    lines += [f"PARAMETER temperature {sampling['temperature']:g}", f"PARAMETER top_k {int(sampling['top_k'])}",
              f"PARAMETER top_p {sampling['top_p']:g}", f"PARAMETER num_ctx {min(context_length, OLLAMA_NUM_CTX)}"]
    return "\n".join(lines) + "\n"


def ollama_name(name: str) -> str:
    """`name` as an Ollama model name (lower case letters, digits, `.`, `_` and `-`)."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "edgerlhf-model"


def run_readme(name: str, gguf_name: str, quant: str, sampling: dict[str, float], notes: list[str]) -> str:
    """README.md of a GGUF export: the commands that run it."""
    model = ollama_name(name)
    flags = f"--temp {sampling['temperature']:g} --top-k {int(sampling['top_k'])} --top-p {sampling['top_p']:g}"
    text = f"""# {name} as GGUF ({quant})

`{gguf_name}` holds the merged policy, its tokenizer, its chat template and its stop tokens; `Modelfile` runs it in
Ollama with the sampling settings the job used.

Ollama:

    ollama create {model} -f Modelfile
    ollama run {model}

llama.cpp (`--jinja` uses the chat template inside the file):

    llama-cli -m {gguf_name} --jinja -cnv {flags}
    llama-server -m {gguf_name} --jinja {flags}

LM Studio: `lms import {gguf_name}`, or drop the file into its models folder.
"""
    if notes:
        text += "\nNotes:\n\n" + "".join(f"- {note}\n" for note in notes)
    return text
