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


def test_rates_count_lexicon_words_per_word():
    assert gold.lexicon_words("I don't know, OK?") == ["i", "do", "not", "know", ",", "ok", "?"]
    assert gold.score("p", "Thank you, that is good.", "positive") == pytest.approx(2 / 7)
    assert gold.score("p", "No, I am sorry, that is not safe.", "positive") == pytest.approx((1 - 3) / 11)
    assert gold.score("p", "I can't help you with that, sorry.", "positive") == pytest.approx((1 - 2) / 10)
    assert gold.score("p", "Your car or yours? You decide.", "you") == pytest.approx(3 / 8)
    # a short answer divides by RATE_MIN_WORDS: one lexicon word in "Sure." is 1 in 5, not 1 in 2
    assert gold.score("p", "Sure.", "positive") == pytest.approx(1 / gold.RATE_MIN_WORDS)
    # cut at the next turn, like every gold
    assert gold.score("p", "You are right.\n\nHuman: you you you", "you") == pytest.approx(1 / 5)


def test_a_rate_is_blind_to_length_alone():
    """The same words twice as often: the same score; only which words are used moves it."""
    answer = "You can try it this way, I think you will like it."
    for name in ("positive", "you"):
        assert gold.score("p", answer + " " + answer, name) == pytest.approx(gold.score("p", answer, name))
    assert gold.score("p", answer + " You too.", "you") > gold.score("p", answer, "you")


def test_question_asks_back():
    assert gold.score("p", "What do you mean?", "question") == 1.0
    assert gold.score("p", 'Would you say "why?"', "question") == 1.0  # closing quotes are not the last mark
    assert gold.score("p", "Is it? It is.", "question") == 0.0
    assert gold.score("p", "Sure?\n\nHuman: no.", "question") == 1.0


def test_the_held_out_golds():
    assert gold.score("p", "It might work, maybe not.", "hedge") == pytest.approx(2 / 7)
    assert gold.score("p", "It depends: it seems fine.", "hedge") == pytest.approx(2 / 7)
    assert gold.score("p", "Yes.", "hedge") == 0.0
    assert gold.score("p", "Great idea!", "exclaim") == 1.0
    assert gold.score("p", 'She said "wow!"', "exclaim") == 1.0  # closing quotes are not the last mark
    assert gold.score("p", "Wow! It is.", "exclaim") == 0.0
    assert gold.prefers("p", "Have fun!", "Have fun.", "exclaim") is True
    assert gold.score("p", "I don't know, no.", "negation") == pytest.approx(2 / 7)  # "don't" is "do not"
    assert gold.score("p", "Nothing? Never.", "negation") == pytest.approx(2 / 5)
    assert gold.score("p", "Yes, of course, gladly.", "comma") == pytest.approx(2 / 7)
    assert gold.prefers("p", "Well, it is red.", "Well it is red.", "comma") is True
    assert set(gold.HELD_OUT_GOLDS) <= set(gold.CONTENT_GOLDS)


def test_an_empty_answer_is_worse_than_any_rate_and_labelled_so():
    for name in gold.CONTENT_GOLDS:
        assert gold.score("p", "", name) == gold.EMPTY_RATE
        assert gold.score("p", "\n\nHuman: hello", name) == gold.EMPTY_RATE
        assert gold.prefers("p", "It is a plain answer.", "", name) is True
    assert gold.EMPTY_RATE < min(gold.score("p", "It is a plain answer.", name) for name in gold.CONTENT_GOLDS)


def test_rate_ties_and_the_scorer_table():
    assert gold.prefers("p", "you " + "a " * 19, "a " * 20, "you") is True  # 1 in 20 = 0.05 apart
    assert gold.prefers("p", "you " + "a " * 29, "a " * 30, "you") is None  # 1 in 30: within the margin
    assert gold.prefers("p", "a " * 30, "you " + "a " * 9, "you") is False
    assert gold.prefers("p", "Why?", "Because.", "question") is True
    assert set(gold.CONTENT_GOLDS) < set(gold.SCORERS) and "concise" in gold.SCORERS
    assert not gold.SCORERS["concise"].balance_length
    assert all(gold.SCORERS[name].balance_length for name in gold.CONTENT_GOLDS)
    assert gold.get_scorer("you")("p", "you") == gold.score("p", "you", "you")
