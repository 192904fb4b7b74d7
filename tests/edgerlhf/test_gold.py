"""The known-answer gold scorer: exact word counts, scores, ties and preferences."""

import pytest

from edgerlhf import gold


@pytest.mark.parametrize("text, n", [
    ("", 0), ("   ", 0), ("Yes", 1), ("Hi, you!", 4), ("I'm fine.", 5), ("3.5 apples", 4),
    ("Sure thing.\n\nHuman: and more words here", 3),  # cut at the next human turn
    ("\n\nHuman: all of this is the next turn", 0),
])
def test_words(text, n):
    assert gold.words(text) == n


def test_scores():
    assert gold.score("\n\nHuman: hi\n\nAssistant:", "Hello there.") == -3.0
    assert gold.score("any prompt", "") == -float(gold.EMPTY_WORDS) == -40.0
    assert gold.score_batch(["p", "p"], ["a b", "a b c"]) == [-2.0, -3.0]
    with pytest.raises(ValueError, match="unknown gold scorer"):
        gold.score("p", "r", name="polite")


def test_prefers_shorter_with_a_tie_margin():
    assert gold.prefers("p", "one two", "one two three four") is True       # 2 vs 4 words
    assert gold.prefers("p", "one two three four", "one two") is False
    assert gold.prefers("p", "a b c d e f g h i j", "a b c d e f g h i j k l") is None  # 10 vs 12: within 30 %
    assert gold.prefers("p", "a b c d e f g h i j", "a b c d e f g h i j k l m") is True  # 10 vs 13
    assert gold.prefers("p", "a", "a b") is True  # one word apart always counts
    assert gold.prefers("p", "same words", "other words") is None
    # an empty answer is not the best one: it loses to any answer of under ~30 words
    assert gold.prefers("p", "", "a short answer") is False
    assert gold.prefers("p", " ".join(["w"] * 29), "") is True
