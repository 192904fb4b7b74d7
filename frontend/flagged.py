"""Texts the dashboard hides by default on its landing views: samples whose prompt or answer holds a slur or an
obscenity.

HH-RLHF's red-team prompts are written to provoke (slurs included), and a job's Overview, its verdict's examples and
its Samples tab show whatever the run sampled. Those views hide a flagged sample unless the person asks to see it
(`Settings.dashboard_hide_flagged` turns the default off). This is a courtesy for whoever opens the page, not a
content filter: the data, the training and the API are untouched.

The list is small and only holds words that are offensive in any sense they have (racial, ethnic, homophobic and
transphobic slurs, and the strongest obscenities), so that ordinary text is never hidden; a word counts with its
plural, and with the digits and signs that stand in for letters (`n1gg3r`). The words are stored in ROT13 so that the
source does not print them.
"""

from __future__ import annotations

import codecs
import re

_ROT13_WORDS = ("avttre avttn xvxr fcvp jrgonpx snttbg genaal ergneq ergneqrq phag shpx shpxre shpxvat shpxva shpxrq "
                "zbgureshpxre")
WORDS = frozenset(codecs.decode(_ROT13_WORDS, "rot13").split())
"""The flagged words, lower case (ROT13 in the source)."""

_LEET = str.maketrans({"0": "o", "1": "i", "!": "i", "|": "i", "3": "e", "4": "a", "@": "a", "5": "s", "$": "s",
                       "7": "t"})
_WORD = re.compile(r"[a-z]+")


def _forms(word: str) -> tuple[str, ...]:
    """The word and the singular it may be the plural of (`spics`, `trannies`)."""
    forms = [word]
    if word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if word.endswith("s"):
        forms.append(word[:-1])
    return tuple(forms)


def is_flagged(text: str | None) -> bool:
    """Whether `text` holds one of `WORDS` as a whole word (any case, plural, or with look-alike digits)."""
    if not text:
        return False
    words = _WORD.findall(text.lower().translate(_LEET))
    return any(form in WORDS for word in words for form in _forms(word))


def flagged_sample(sample: dict) -> bool:
    """Whether any text of a sample or an SFT-vs-aligned pair (`prompt`, `response`, `sft`, `ppo`) is flagged."""
    return any(is_flagged(sample.get(field)) for field in ("prompt", "response", "sft", "ppo"))
