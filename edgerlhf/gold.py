"""The known-answer tasks: "gold" scorers defined on the text, whose preferences are the truth.

Random-weight models cannot show alignment on human labels, so the `tiny` preset relabels HH-RLHF pairs
with a scorer we can compute exactly (`data.labels = "gold"`, `data.gold_scorer` names it), trains the
reward model on those labels and runs PPO against that reward model; the gold score of fresh samples then
measures whether the whole loop moved the policy towards the truth (the "gold reward model" set-up of
Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", with hand-written golds).

A *word* is a run of letters and digits, or a single punctuation mark (`words`); responses are cut at
the first stop marker (`edgerlhf.dialogue.cut_at_stop`) before scoring, so a raw continuation that runs
into a new "\\n\\nHuman:" turn is scored like the response a user would see.

**Length.** `concise` is about length only: PPO satisfies it by emitting EOS earlier. The other golds
are about *content*, and length is made irrelevant in two ways. By construction: `positive` and `you` are
shares of the response's words (`lexicon_rate`), so an answer made longer or shorter with words like its
own keeps its expected score, and `question` and `starts_with_i` look at one mark only, the last or the
first. And by the data: for a gold about content (`Gold.balance_length`) the labelled pairs are balanced
by length (`data.balance_by_length`), so the preferred answer is the longer one exactly as often as the
shorter one. The data report gives, for
every gold, its correlation with the length of the responses (`DataReport.gold_length_correlation`: within
about 0.1 of 0 for the content golds on the `tiny` preset's pairs, -1 for `concise` by definition), and
the evaluation reports the gold gain at equal length (`evaluate.stratified_difference`).

    concise    -words(response)                              fewer words is better
    positive   (positive - negative lexicon words) / words   a warmer, more positive answer
    you        second-person words ("you", "your") / words   an answer that addresses the user
    question   1 if the answer ends with "?", else 0         an answer that asks the user back
    starts_with_i  1 if the answer opens with "I", else 0    an answer in the first person from its first word
    hedge      hedging words ("maybe", "might") / words      an answer that says how sure it is (held out)
    exclaim    1 if the answer ends with "!", else 0         an enthusiastic answer (held out)
    negation   negating words ("not", "no", "never") / words   an answer that declines or contradicts (held out)
    comma      commas / words                                an answer in longer, joined-up sentences (held out)

The rates divide by `max(words, RATE_MIN_WORDS)`: a one-word answer cannot reach a rate of 1 ("Sure."
counts as one positive word in five), so the degenerate way up, answering with one lexicon word, is closed
(and shortening below five words can only lose). Negations are spelled out first ("don't" counts as
"do not").

Why a tiny model could learn each: the lexicon words of `positive` and `you` are among the most frequent
in HH answers ("you" is the most frequent word; "sure", "help", "good", "not", "sorry" follow), so the
SFT policy already samples them and PPO only has to shift their probabilities; `question` needs one token
("?") before the end, where the reward model reads the answer's last token, and `starts_with_i` one
token at the start (22 % of HH answers open with "I"). A reward model on a random
base needs word features to count lexicon words: the `tiny` preset's reward LoRA adapts the token embedding
(`reward.adapt_embedding`). What a tiny model *does* learn at the `tiny` budget is measured, not assumed, at
three seeds per gold: `edgerlhf.lab.known_answer` (README, "Known-answer suite").

**Empty answers.** A scorer that rewards shorter answers, or a share that an empty answer cannot get
wrong, would make the empty answer a good one, a degenerate optimum PPO finds quickly. So an empty
response is worse than typical answers: `concise` counts it as `EMPTY_WORDS` words, the content golds
give it `EMPTY_RATE` (below every answer without a single lexicon word, or that asks nothing). Cleaning
drops empty responses from the data, so with `labels = "gold"` the data stage adds, for a share of
training pairs (`data.gold_empty_fraction`), a pair (response vs "") that the gold labels, and the reward
model learns this rule too.

**Ties.** `prefers` (used to label pairs) calls two scores a tie when they differ by less than the gold's
`tie_margin` (or `tie_fraction` of the smaller magnitude), and tied pairs are dropped: a difference the
model cannot see is noise. To add a gold, write its `(prompt, response) -> float` (higher is better) and
register it in `SCORERS` as a `Gold` with its tie margin; `lexicon_rate` builds the share-of-words kind.
A gold must tell apart many HH responses: the data report counts the pairs it keeps, and one about a rare
word leaves too few to learn from (a gold "mentions `think`" kept 88 of 3,312 pairs, against 261-442 for
the golds above).

Used by: the data stage (relabelling, `prefers`, the report) and the SFT / PPO / evaluate stages (`score`,
`score_batch`, `probe_score`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edgerlhf.dialogue import cut_at_stop

EMPTY_WORDS = 40
"""`concise`: an empty response scores like a response of this many words."""

TIE_MARGIN = 0.3
"""`concise`: two word counts within this fraction of the smaller one are a tie (see `prefers`)."""

RATE_MIN_WORDS = 5
"""A rate divides by at least this many words (see the module docstring)."""

EMPTY_RATE = -0.25
"""A content gold's score of an empty response: below every answer that avoids the lexicon altogether."""

RATE_TIE_MARGIN = 0.04
"""Rates closer than this are a tie: about one lexicon word in 25."""

_WORD = re.compile(r"\w+|[^\w\s]")
_NEGATED = re.compile(r"n[’']t\b", re.IGNORECASE)
_CLOSERS = " \t\n\"'”’)]"


def words(text: str) -> int:
    """Words of a response, after cutting at the stop markers: runs of letters and digits, and each
    punctuation mark or symbol on its own ("Hi, you!" has 4).

    Counted this way, the longer of two HH responses is also the one with more GPT-2 tokens in 99.6 % of
    the clearly different pairs (96.4 % for whitespace-separated words), so the labels are ones a model
    can actually see.
    """
    return len(_WORD.findall(cut_at_stop(text)))


def lexicon_words(text: str) -> list[str]:
    """The lower-cased words of a response cut at the stop markers, with "n't" spelled " not"."""
    return [w.lower() for w in _WORD.findall(_NEGATED.sub(" not", cut_at_stop(text)))]


def lexicon_rate(response: str, plus: Iterable[str], minus: Iterable[str] = ()) -> float:
    """(words in `plus` - words in `minus`) / max(words, `RATE_MIN_WORDS`); `EMPTY_RATE` for an empty response."""
    found = lexicon_words(response)
    if not found:
        return EMPTY_RATE
    plus, minus = set(plus), set(minus)
    return (sum(w in plus for w in found) - sum(w in minus for w in found)) / max(len(found), RATE_MIN_WORDS)


# --- the golds -------------------------------------------------------------------------------------

def concise(prompt: str, response: str) -> float:
    """Fewer words is better; an empty response counts as `EMPTY_WORDS` words."""
    n = words(response)
    return -float(n if n > 0 else EMPTY_WORDS)


POSITIVE_WORDS = frozenset("""
    good great glad happy sure yes thanks thank love nice well help helpful best fine enjoy fun welcome hope
    interesting okay ok definitely wonderful excellent safe kind better beautiful easy awesome perfect agree
    """.split())
"""`positive`: words of a warm, positive answer, frequent in HH answers."""
NEGATIVE_WORDS = frozenset("""
    not no never nothing sorry bad hate wrong kill illegal dangerous harm hurt steal stupid terrible die
    crime worse worst problem afraid unfortunately difficult sad angry
    """.split())
"""`positive`: words of a negative or refusing answer ("don't" counts as "do not")."""


def positive(prompt: str, response: str) -> float:
    """Sentiment per word: (positive - negative lexicon words) / words."""
    return lexicon_rate(response, POSITIVE_WORDS, NEGATIVE_WORDS)


SECOND_PERSON = frozenset({"you", "your", "yours", "yourself", "yourselves"})
"""`you`: the words that address the user."""


def you(prompt: str, response: str) -> float:
    """Second-person words per word: an answer about the person asking."""
    return lexicon_rate(response, SECOND_PERSON)


def last_mark_is(response: str, mark: str) -> float:
    """1 when the response's last mark, closing quotes and brackets aside, is `mark`, else 0; `EMPTY_RATE` if empty."""
    text = cut_at_stop(response).rstrip(_CLOSERS)
    if not text:
        return EMPTY_RATE
    return float(text.endswith(mark))


def question(prompt: str, response: str) -> float:
    """1 when the answer ends by asking the user something (its last mark is "?"), else 0; `EMPTY_RATE` if empty."""
    return last_mark_is(response, "?")


def starts_with_i(prompt: str, response: str) -> float:
    """1 if the answer opens with the word "I" ("I think", "I'm"), else 0: a property of the answer's first word."""
    text = cut_at_stop(response).strip()
    if not text:
        return EMPTY_RATE
    return float(re.match(r"I\b", text) is not None)


# The held-out golds: written down on 2026-12-05, after the loop and its settings, before any run on them
# (README, "Held-out golds"); no setting was tuned on them, and their results are reported as they came out.

HEDGE_WORDS = frozenset("""
    maybe might perhaps probably possibly likely unlikely usually sometimes often generally depends seem seems
    """.split())
"""`hedge`: words that state uncertainty or qualify a claim."""


def hedge(prompt: str, response: str) -> float:
    """Hedging words per word: an answer that says how sure it is ("it might", "probably", "it depends")."""
    return lexicon_rate(response, HEDGE_WORDS)


def exclaim(prompt: str, response: str) -> float:
    """1 when the answer ends with an exclamation (its last mark is "!"), else 0; `EMPTY_RATE` if empty."""
    return last_mark_is(response, "!")


# The second pair of held-out golds: written down on 2026-12-06, before any run on them, and chosen among nine
# candidates by one criterion only: at least 200 labelled pairs kept on the `tiny` preset's data (the first pair
# kept 98 and 25, too few for a reward model; README, "Held-out golds").

NEGATION_WORDS = frozenset("not no never nothing cannot none nobody neither nor".split())
"""`negation`: words that decline, deny or contradict ("don't" counts as "do not")."""


def negation(prompt: str, response: str) -> float:
    """Negating words per word: an answer that declines or contradicts ("I don't think so", "never")."""
    return lexicon_rate(response, NEGATION_WORDS)


def comma(prompt: str, response: str) -> float:
    """Commas per word: an answer in longer sentences, with clauses joined rather than cut short."""
    return lexicon_rate(response, {","})


@dataclass(frozen=True)
class Gold:
    """A gold scorer: the score of a response (higher is better) and when two scores are a tie."""

    score: Callable[[str, str], float]
    """(prompt, response) -> score."""
    tie_margin: float
    """Scores closer than this are a tie."""
    tie_fraction: float = 0.0
    """... or closer than this fraction of the smaller magnitude."""
    balance_length: bool = True
    """Keep the labelled data balanced by length (`data.balance_by_length`): the preferred response is the
    longer one as often as the shorter, so length predicts nothing about the labels. False for a gold
    about length."""

    def __call__(self, prompt: str, response: str) -> float:
        return self.score(prompt, response)

    def tie(self, a: float, b: float) -> bool:
        return abs(a - b) < max(self.tie_margin, self.tie_fraction * min(abs(a), abs(b)))


SCORERS: dict[str, Gold] = {
    # Scores closer than 30 % of the smaller (at least one word) are a tie: word counts and the token counts
    # a model sees disagree on about 5 % of near-equal HH pairs.
    "concise": Gold(concise, tie_margin=1.0, tie_fraction=TIE_MARGIN, balance_length=False),
    "positive": Gold(positive, tie_margin=RATE_TIE_MARGIN),
    "you": Gold(you, tie_margin=RATE_TIE_MARGIN),
    "question": Gold(question, tie_margin=0.2),
    "starts_with_i": Gold(starts_with_i, tie_margin=0.2),
    "hedge": Gold(hedge, tie_margin=RATE_TIE_MARGIN),
    "exclaim": Gold(exclaim, tie_margin=0.2),
    "negation": Gold(negation, tie_margin=RATE_TIE_MARGIN),
    "comma": Gold(comma, tie_margin=RATE_TIE_MARGIN),
}
"""Gold scorers by name (`data.gold_scorer`)."""

HELD_OUT_GOLDS = ("hedge", "exclaim", "negation", "comma")
"""Golds written down after the loop was built and not tuned on (README, "Held-out golds"): what it does on a
preference it was not built around."""

CONTENT_GOLDS = tuple(name for name, g in SCORERS.items() if g.balance_length)
"""The golds about content rather than length."""


def get_scorer(name: str = "concise") -> Gold:
    if name not in SCORERS:
        raise ValueError(f"unknown gold scorer {name!r}; choose from {sorted(SCORERS)}")
    return SCORERS[name]


def score(prompt: str, response: str, name: str = "concise") -> float:
    """The gold score of one response (higher is better)."""
    return get_scorer(name)(prompt, response)


IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
"""`package.module:function`: a reward function given by where to import it."""


def is_import_path(spec: str) -> bool:
    return IMPORT_PATH.fullmatch(spec) is not None


def reward_function(spec: str) -> Callable[[str, str], float]:
    """The function `ppo.reward_function` names: a gold scorer (the truth of a known-answer task, used as the
    reward itself), or `package.module:function` imported from the Python path; (prompt, response) -> float."""
    if spec in SCORERS:
        return SCORERS[spec].score
    if not is_import_path(spec):
        raise ValueError(f"reward function {spec!r} is neither a gold scorer ({sorted(SCORERS)}) nor "
                         "`package.module:function`")
    import importlib

    module, name = spec.split(":")
    function = getattr(importlib.import_module(module), name, None)
    if not callable(function):
        raise ValueError(f"reward function {spec!r}: {module} has no function {name!r}")
    return function


def score_batch(prompts: list[str], responses: list[str], name: str = "concise") -> list[float]:
    """Gold scores of many (prompt, response) pairs."""
    scorer = get_scorer(name)
    return [scorer(p, r) for p, r in zip(prompts, responses, strict=True)]


def prefers(prompt: str, a: str, b: str, name: str = "concise") -> bool | None:
    """True when the gold clearly prefers response `a`, False when it clearly prefers `b`, None for a tie
    (`Gold.tie`). Ties are dropped from the known-answer data (their count is in the data report)."""
    gold = get_scorer(name)
    sa, sb = gold(prompt, a), gold(prompt, b)
    if gold.tie(sa, sb):
        return None
    return sa > sb


def probe_score(prompt: str, response: str, data_cfg) -> float | None:
    """What a probe sample is scored with, the same in every stage: the gold score on the known-answer task
    (`data.labels = "gold"`), else nothing. A reward-model score cannot be the common scale: the SFT stage
    runs before any reward model exists."""
    return score(prompt, response, data_cfg.gold_scorer) if data_cfg.labels == "gold" else None
