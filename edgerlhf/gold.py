"""The known-answer task: a "gold" scorer defined on the text, whose preferences are the truth.

Random-weight models cannot show alignment on human labels, so the `tiny` preset relabels HH-RLHF pairs
with a scorer we can compute exactly (`data.labels = "gold"`), trains the reward model on those labels and
runs PPO against that reward model; the gold score of fresh samples then measures whether the whole loop
moved the policy towards the truth (the "gold reward model" set-up of Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization", with a hand-written gold).

The gold is **conciseness** (`concise`): fewer words is better (a word is a run of letters and digits,
or a single punctuation mark: see `words`).

    score(prompt, response) = -words(response)       for a response with at least one word
    score(prompt, "")       = -EMPTY_WORDS (= -40)     an empty response is worth as little as a 40-word one

Why this task: a tiny random GPT-2 learns it in minutes on a CPU. In a preference pair both responses
follow the same prompt, so the longer text is the longer response and a reward model can rank by the
position of the last token, which GPT-2's position embeddings expose directly; a policy can shorten its
answers simply by emitting EOS (or "\n\nHuman:") earlier, which gives PPO a strong, smooth signal.

Why the empty-response rule: pure "shorter is better" would make the empty response the best answer, a
degenerate optimum that PPO would happily find (a weak SFT model already emits EOS first fairly often).
Here the best answers are one-word ones and an empty one is worse than a typical long answer, so
collapsing to empty answers shows up in the gold score as a failure, not as success. Cleaning drops
empty responses from the data, so with `labels = "gold"` the data stage adds, for a share of pairs
(`data.gold_empty_fraction`), the pair (chosen vs "") that the gold labels, and the reward model learns
this rule too.

`prefers` (used to label pairs) calls scores within 30 % of each other a tie, and such pairs are dropped.

Responses are cut at the first stop marker (`edgerlhf.dialogue.cut_at_stop`) before counting, so a raw
continuation that runs into a new "\\n\\nHuman:" turn is scored like the response a user would see.
`prompt` is accepted for scorers that need it; `concise` ignores it.

Used by: the data stage (relabelling, `prefers`) and the PPO / evaluate stages (`score`, `score_batch`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from edgerlhf.dialogue import cut_at_stop

EMPTY_WORDS = 40
"""An empty response scores like a response of this many words."""

TIE_MARGIN = 0.3
"""`prefers` calls two responses a tie when their scores differ by less than this fraction (see there)."""

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> int:
    """Words of a response, after cutting at the stop markers: runs of letters and digits, and each
    punctuation mark or symbol on its own ("Hi, you!" has 4).

    Counted this way, the longer of two HH responses is also the one with more GPT-2 tokens in 99.6 % of
    the clearly different pairs (96.4 % for whitespace-separated words), so the labels are ones a model
    can actually see.
    """
    return len(_WORD.findall(cut_at_stop(text)))


def concise(prompt: str, response: str) -> float:
    """Fewer words is better; an empty response counts as `EMPTY_WORDS` words."""
    n = words(response)
    return -float(n if n > 0 else EMPTY_WORDS)


SCORERS: dict[str, Callable[[str, str], float]] = {"concise": concise}
"""Gold scorers by name (`data.gold_scorer`)."""


def get_scorer(name: str = "concise") -> Callable[[str, str], float]:
    if name not in SCORERS:
        raise ValueError(f"unknown gold scorer {name!r}; choose from {sorted(SCORERS)}")
    return SCORERS[name]


def score(prompt: str, response: str, name: str = "concise") -> float:
    """The gold score of one response (higher is better)."""
    return get_scorer(name)(prompt, response)


def score_batch(prompts: list[str], responses: list[str], name: str = "concise") -> list[float]:
    """Gold scores of many (prompt, response) pairs."""
    scorer = get_scorer(name)
    return [scorer(p, r) for p, r in zip(prompts, responses, strict=True)]


def prefers(prompt: str, a: str, b: str, name: str = "concise") -> bool | None:
    """True when the gold clearly prefers response `a`, False when it clearly prefers `b`, None for a tie.

    Scores closer than `TIE_MARGIN` of the smaller magnitude (at least 1) are a tie: word counts and the
    token counts a model sees disagree on about 5 % of near-equal HH pairs, and a label the model cannot
    see is noise. Ties are dropped from the known-answer data (their count is in the data report).
    """
    sa, sb = score(prompt, a, name), score(prompt, b, name)
    if abs(sa - sb) < max(1.0, TIE_MARGIN * min(abs(sa), abs(sb))):
        return None
    return sa > sb


def probe_score(prompt: str, response: str, data_cfg) -> float | None:
    """What a probe sample is scored with, the same in every stage: the gold score on the known-answer task
    (`data.labels = "gold"`), else nothing. A reward-model score cannot be the common scale: the SFT stage
    runs before any reward model exists."""
    return score(prompt, response, data_cfg.gold_scorer) if data_cfg.labels == "gold" else None
