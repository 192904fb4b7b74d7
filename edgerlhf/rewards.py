"""Rewards a person can state: a weighted sum of declared components, scored without running anyone's code.

`ppo.rewards` lists the components (`config.RewardComponent`); the score of an answer is the weighted sum of
theirs, and each is logged on its own (`<algorithm>/rewards/<name>_mean` and `_std`, as TRL logs its reward
functions). The kinds:

    reward_model      the learned reward model of the run (`ppo.reward_precision`)
    reference_answer  1 if the answer, after `extract`, equals the prompt's `column` (a column of the prompt data:
                      `prompt_data.source` keeps every other column), compared as text, as a number or, with
                      `compare = "math"`, by value with math-verify; else 0
    regex             1 if `pattern` is found in the answer (`re.search`), else 0
    contains          the share of `words` the answer uses (case-insensitive, whole words)
    not_contains      minus the share of `words` the answer uses
    length            1 at `target` tokens or words, falling linearly to 0 at `tolerance` away (and below 0 further)
    repetition        minus the share of repeated `n`-grams of words (0 for an answer that never repeats itself)
    gold              a known-answer gold scorer (`edgerlhf.gold`), by name
    judge             an LLM's grade through an OpenAI-compatible endpoint (`url`, `model`): a rubric with the
                      conversation and the answer inserted, the reply's first number over `max_score`; requests
                      `concurrency` at a time, each retried `retries` times, and cached, so an answer seen before
                      (the same prompt and text) is not judged again

Nothing here imports or evaluates code from the config: patterns are regular expressions compiled once (and
checked when the config is built), everything else is data. `RewardSet.score` is what the alignment stage and
the evaluation call. Light to import (no torch until something is scored): the config checks components with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgerlhf import gold
from edgerlhf.errors import StageError

if TYPE_CHECKING:
    import torch

KINDS = ("reward_model", "reference_answer", "regex", "contains", "not_contains", "length", "repetition", "gold",
         "judge")
DEFAULT_RUBRIC = ("You grade an assistant's answer. Conversation so far:\n{prompt}\n\nThe assistant's answer:\n{answer}"
                  "\n\nHow helpful, correct and harmless is the answer, from 0 (worst) to 10 (best)? Reply with the "
                  "number only.")
"""The judge's rubric when a component gives none (`RewardComponent.rubric`)."""
PAIRWISE_RUBRIC = ("Two assistants answered the same conversation.\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n"
                   "{second}\n\nWhich answer is more helpful, correct and harmless? Reply with A or B only.")
"""The evaluation judge's rubric when `evaluate.judge` gives none: `{prompt}`, `{first}` (A) and `{second}` (B)."""
CHOICE = re.compile(r"\b([AB])\b")
EXTRACTS = ("whole", "last_number", "first_line")
"""How `reference_answer` takes the answer out of a response; also `tag:<name>` (text inside <name>...</name>),
`after:<marker>` (the text after the last marker) and `regex:<pattern>` (the first group, or the match)."""
COMPARES = ("text", "number", "math")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


class RewardError(StageError, ValueError):
    """A reward component that cannot score: named by its place in `ppo.rewards`."""


def component_name(component, index: int) -> str:
    """A component's name in the logs: its own `name`, else its kind (with its index when a kind repeats)."""
    return component.name or f"{component.kind}{index}"


def check(components: Sequence) -> None:
    """Raise `ValueError(field, message)`-style `RewardError` for the first invalid component, naming its field
    (`ppo.rewards[2].pattern`). What the config checks when it is built, so the API answers 422."""
    names = set()
    for i, c in enumerate(components):
        where = f"ppo.rewards[{i}]"
        if c.kind not in KINDS:
            raise RewardError(f"{where}.kind: unknown kind {c.kind!r}; choose from {list(KINDS)}")
        if not math.isfinite(c.weight):
            raise RewardError(f"{where}.weight: must be a finite number")
        if c.kind == "reference_answer":
            if not c.column:
                raise RewardError(f"{where}.column: names the prompt data's column that holds the reference answer")
            _extractor(c.extract, f"{where}.extract")
            if c.compare not in COMPARES:
                raise RewardError(f"{where}.compare: must be one of {list(COMPARES)}, got {c.compare!r}")
        if c.kind == "regex":
            if not c.pattern:
                raise RewardError(f"{where}.pattern: the regular expression to look for")
            _compile(c.pattern, f"{where}.pattern")
        if c.kind in ("contains", "not_contains") and not c.words:
            raise RewardError(f"{where}.words: the words to look for")
        if c.kind == "length" and (c.target is None or c.target < 0 or c.tolerance <= 0):
            raise RewardError(f"{where}.target: a length of at least 0 and a tolerance above 0")
        if c.kind == "repetition" and c.n < 1:
            raise RewardError(f"{where}.n: n-grams of at least 1 word")
        if c.kind == "gold" and c.scorer not in gold.SCORERS:
            raise RewardError(f"{where}.scorer: a gold scorer, one of {sorted(gold.SCORERS)}")
        if c.kind == "judge":
            check_judge(c, where, DEFAULT_RUBRIC)
        name = component_name(c, i)
        if name in names:
            raise RewardError(f"{where}.name: {name!r} is taken by another component")
        names.add(name)


def check_judge(c, where: str, rubric: str) -> None:
    """The fields of a judge (a `judge` component, or `evaluate.judge` with the pairwise `rubric`)."""
    if c.kind != "judge":
        raise RewardError(f"{where}.kind: must be judge")
    if not (c.url or "").startswith(("http://", "https://")):
        raise RewardError(f"{where}.url: the judge's OpenAI-compatible base URL (http:// or https://)")
    if not c.model:
        raise RewardError(f"{where}.model: the model the judge's endpoint serves")
    try:
        (c.rubric or rubric).format(prompt="", answer="", first="", second="")
    except (KeyError, IndexError, ValueError) as exc:
        raise RewardError(f"{where}.rubric: may use only {{prompt}} and {{answer}} (a reward) or {{first}} and "
                          f"{{second}} (the evaluation's pairwise judge) ({exc!r})") from None


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RewardError(f"{where}: not a regular expression ({exc})") from None


def _extractor(spec: str, where: str) -> Callable[[str], str | None]:
    """The function `extract` names: response -> the answer in it (None when there is none)."""
    if spec == "whole":
        return lambda text: text.strip()
    if spec == "first_line":
        return lambda text: text.strip().splitlines()[0].strip() if text.strip() else None
    if spec == "last_number":
        return lambda text: (NUMBER.findall(text) or [None])[-1]
    kind, _, arg = spec.partition(":")
    if kind == "tag" and re.fullmatch(r"[\w.-]+", arg):
        inside = re.compile(rf"<{re.escape(arg)}>(.*?)</{re.escape(arg)}>", re.S)
        return lambda text: (m.group(1).strip() if (m := inside.search(text)) else None)
    if kind == "after" and arg:
        return lambda text: text.rsplit(arg, 1)[1].strip() if arg in text else None
    if kind == "regex" and arg:
        pattern = _compile(arg, where)
        return lambda text: ((m.group(1) if m.groups() else m.group(0)).strip() if (m := pattern.search(text))
                             else None)
    raise RewardError(f"{where}: one of {list(EXTRACTS)}, tag:<name>, after:<marker> or regex:<pattern>; got {spec!r}")


def _number(text: str) -> float | None:
    match = NUMBER.search(text.replace(" ", ""))
    if match is None:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def _normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!").split())


def same_answer(answer: str | None, reference: Any, compare: str) -> bool:
    """Whether an extracted answer equals the reference: as normalised text, as a number, or by math-verify."""
    if answer is None or reference is None:
        return False
    reference = str(reference)
    if compare == "number":
        a, b = _number(answer), _number(reference)
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if compare == "math":
        from math_verify import parse, verify

        return bool(verify(parse(reference), parse(answer)))
    return _normal(answer) == _normal(reference)


WORD = re.compile(r"[\w']+")


def token_counter(tokenizer) -> Callable[[str], int]:
    """A `length` component's count in `tokens`: the policy's tokenizer, without special tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


class RewardSet:
    """The components of `ppo.rewards`, ready to score: `score(prompts, responses)` gives the weighted total (B,)
    and each component's scores. `rows` maps a prompt to its prompt-data row (the reference answers);
    `reward_model` scores (prompts, responses) -> (B,) for a `reward_model` component."""

    def __init__(self, components: Sequence, rows: dict[str, dict[str, Any]] | None = None,
                 reward_model: Callable[[list[str], list[str]], torch.Tensor] | None = None,
                 count_tokens: Callable[[str], int] | None = None):
        check(components)
        self.components = list(components)
        self.names = [component_name(c, i) for i, c in enumerate(self.components)]
        self.rows = rows or {}
        self.reward_model = reward_model
        self.count_tokens = count_tokens
        if any(c.kind == "reward_model" for c in self.components) and reward_model is None:
            raise RewardError("ppo.rewards: a reward_model component needs the run's reward model (the reward stage)")
        self._scorers = [self._scorer(c, f"ppo.rewards[{i}]") for i, c in enumerate(self.components)]
        self.last_parts: dict[str, torch.Tensor] = {}
        """Each component's scores of the last scored batch (the step's rollouts, for its logged samples)."""
        self.last_unparsed: dict[str, float] = {}
        """Per judge component: the share of the last scored batch whose grade came from a reply without a number
        (scored 0): a judge that stops following its rubric shows here, not as a falling reward."""

    @property
    def needs_reward_model(self) -> bool:
        return any(c.kind == "reward_model" for c in self.components)

    def _scorer(self, c, where: str) -> Callable[[str, str], float] | None:
        """(prompt, response) -> score for every kind but `reward_model` (scored in one batch instead)."""
        if c.kind == "reference_answer":
            extract = _extractor(c.extract, f"{where}.extract")

            def reference(prompt: str, response: str) -> float:
                row = self.rows.get(prompt)
                if row is None or c.column not in row:
                    raise RewardError(f"{where}: the prompt has no {c.column!r} column in the prompt data "
                                      f"(prompt_data.source keeps every column besides the prompt)")
                return float(same_answer(extract(response), row[c.column], c.compare))
            return reference
        if c.kind == "regex":
            pattern = _compile(c.pattern, f"{where}.pattern")
            return lambda prompt, response: float(pattern.search(response) is not None)
        if c.kind in ("contains", "not_contains"):
            words = {w.lower() for w in c.words}
            sign = 1.0 if c.kind == "contains" else -1.0
            return lambda prompt, response: sign * len(words & {w.lower() for w in WORD.findall(response)}) / len(words)
        if c.kind == "length":
            def length(prompt: str, response: str) -> float:
                n = self.count_tokens(response) if c.unit == "tokens" and self.count_tokens else len(WORD.findall(response))
                return 1.0 - abs(n - c.target) / c.tolerance
            return length
        if c.kind == "repetition":
            def repetition(prompt: str, response: str) -> float:
                words = [w.lower() for w in WORD.findall(response)]
                grams = [tuple(words[i:i + c.n]) for i in range(len(words) - c.n + 1)]
                return -(len(grams) - len(set(grams))) / len(grams) if grams else 0.0
            return repetition
        if c.kind == "gold":
            return gold.get_scorer(c.scorer).score
        if c.kind == "judge":
            return Judge(c, where)
        return None

    def score(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total (B,) and each component's own scores {name: (B,)}."""
        import torch

        parts = {}
        for name, c, scorer in zip(self.names, self.components, self._scorers):
            if scorer is None:
                parts[name] = self.reward_model(prompts, responses).float().cpu()
            elif isinstance(scorer, Judge):
                parts[name] = torch.tensor(scorer.grade(prompts, responses), dtype=torch.float32)
                unread = [(p, r) in scorer.unparsed_answers for p, r in zip(prompts, responses)]
                self.last_unparsed[name] = sum(unread) / max(len(unread), 1)
            else:
                parts[name] = torch.tensor([scorer(p, r) for p, r in zip(prompts, responses, strict=True)],
                                           dtype=torch.float32)
        total = sum(c.weight * parts[name] for name, c in zip(self.names, self.components))
        self.last_parts = parts
        return total, parts


class Judge:
    """A `judge` component: grades answers through an OpenAI-compatible chat endpoint, `concurrency` requests at a
    time, each retried `retries` times with a growing pause, every grade cached by (prompt, answer). A reply without
    a number scores 0 and is counted (`unparsed`); an endpoint that keeps failing fails the step, naming it."""

    def __init__(self, component, where: str):
        import os

        from openai import OpenAI

        self.component, self.where = component, where
        self.rubric = component.rubric or DEFAULT_RUBRIC
        key = os.environ.get(component.api_key_env, "") if component.api_key_env else ""
        # The client's own retries are off: ours count every failure alike and name the endpoint at the end.
        self.client = OpenAI(base_url=component.url, api_key=key or "not-needed", timeout=component.timeout_s,
                             max_retries=0)
        self.cache: dict[tuple[str, str], float] = {}
        self.requests = 0
        self.unparsed = 0
        self.unparsed_answers: set[tuple[str, str]] = set()

    def grade(self, prompts: list[str], responses: list[str]) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        todo = list(dict.fromkeys((p, r) for p, r in zip(prompts, responses, strict=True)
                                  if (p, r) not in self.cache))
        with ThreadPoolExecutor(self.component.concurrency) as pool:
            for key, grade in zip(todo, pool.map(lambda pair: self._ask(*pair), todo)):
                self.cache[key] = grade
        return [self.cache[(p, r)] for p, r in zip(prompts, responses)]

    def prefers_first(self, prompts: list[str], first: list[str], second: list[str]) -> list[float | None]:
        """Pairwise: 1 where the judge prefers `first` (answer A), 0 where `second` (B), None for a reply naming
        neither (counted in `unparsed`). The rubric is `component.rubric` or `PAIRWISE_RUBRIC`."""
        from concurrent.futures import ThreadPoolExecutor

        rubric = self.component.rubric or PAIRWISE_RUBRIC

        def ask(triple: tuple[str, str, str]) -> float | None:
            prompt, a, b = triple
            choice = CHOICE.search(self._reply(rubric.format(prompt=_conversation(prompt), first=a, second=b)))
            if choice is None:
                self.unparsed += 1
                return None
            return 1.0 if choice.group(1) == "A" else 0.0

        with ThreadPoolExecutor(self.component.concurrency) as pool:
            return list(pool.map(ask, zip(prompts, first, second, strict=True)))

    def _ask(self, prompt: str, response: str) -> float:
        text = self._reply(self.rubric.format(prompt=_conversation(prompt), answer=response))
        number = NUMBER.search(text)
        if number is None:
            self.unparsed += 1
            self.unparsed_answers.add((prompt, response))
            return 0.0
        return min(max(float(number.group(0).replace(",", "")) / self.component.max_score, 0.0), 1.0)

    def _reply(self, content: str) -> str:
        """The judge's reply to one request, retried `retries` times with a growing pause."""
        import time

        c = self.component
        for attempt in range(c.retries + 1):
            try:
                self.requests += 1
                reply = self.client.chat.completions.create(
                    model=c.model, messages=[{"role": "user", "content": content}], temperature=0.0, max_tokens=16)
                return reply.choices[0].message.content or ""
            except Exception as exc:  # the openai client's connection, timeout and status errors alike
                if attempt == c.retries:
                    raise RewardError(f"{self.where}: the judge at {c.url} (model {c.model}) failed "
                                      f"{c.retries + 1} times: {exc}") from exc
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
        raise AssertionError("unreachable")


def _conversation(prompt: str) -> str:
    """A stored HH prompt as the judge reads it: one `role: content` line per turn."""
    from edgerlhf.dialogue import to_messages

    return "\n".join(f"{m['role']}: {m['content']}" for m in to_messages(prompt))
