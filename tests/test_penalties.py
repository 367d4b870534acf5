"""Text penalties on concrete strings (rewards/penalties.py)."""

import pytest
import torch

from rewards.penalties import BadPhrasePenalty, LengthReward, RepetitionPenalty, repetition_rate


def vals(t):
    assert t.dtype == torch.float32 and t.dim() == 1
    return [round(x, 6) for x in t.tolist()]


def test_bad_phrase_defaults():
    pen = BadPhrasePenalty()
    assert pen.name == "bad"
    caps = [
        "an image of a red circle",  # -1
        "A  Photo Of a dog, there is a cat",  # -2 (case and whitespace insensitive)
        "a photographer holds a picture frame",  # 0: word-bounded
        "shapes drawn in 1999 and 2023",  # -2: years
        "1234 shapes and 2100 dots",  # 0: not a plausible year (documented choice)
        "a video of 1850",  # -2
        "image of a square",  # 0: only the full phrase counts
        "a blue square",  # 0
    ]
    assert vals(pen(None, caps)) == [-1, -2, 0, -2, 0, -2, 0, 0]


def test_bad_phrase_custom_lists():
    pen = BadPhrasePenalty(phrases=["blue"], regexes=[])
    assert vals(pen(None, ["Blue blue bluebird", "an image of 1999"])) == [-2, 0]
    pen = BadPhrasePenalty(phrases=[], regexes=[r"\d+"])
    assert vals(pen(None, ["3 circles, 12 dots"])) == [-2]


def test_repetition_penalty():
    pen = RepetitionPenalty()
    assert pen.name == "repeat"
    caps = [
        "red red red",  # words 2/3 repeated, bigrams (red red) x2 -> 1/2
        "a red circle and a blue square",  # repeated "a" is a function word; no bigram repeats
        "a red circle, a red circle.",  # words red, circle: 2/6; bigrams "a red", "red circle": 2/5
        "",
    ]
    got = pen(None, caps).tolist()
    assert got == pytest.approx([-(2 / 3 + 1 / 2), 0.0, -(2 / 6 + 2 / 5), 0.0])
    strict = RepetitionPenalty(ignore_words=())
    assert strict(None, [caps[1]]).tolist() == pytest.approx([-1 / 7])
    ngrams_only = RepetitionPenalty(word_repeats="none")
    assert ngrams_only(None, caps).tolist() == pytest.approx([-1 / 2, 0.0, -2 / 5, 0.0])
    # two small objects: the word term charges the second "small"; trigrams alone (as the shapes
    # config counts them) charge nothing, yet still catch a repeated phrase
    two = "a small red circle and a small blue square"
    trigrams = RepetitionPenalty(n=3, word_repeats="none")
    assert RepetitionPenalty(n=3).score(two) == pytest.approx(-1 / 9) and trigrams.score(two) == 0.0
    assert trigrams.score("a red circle, a red circle") == pytest.approx(-1 / 4)
    # adjacent: only a stutter counts (2 of 7 words repeat the word before them; no trigram repeats)
    adjacent = RepetitionPenalty(n=3, word_repeats="adjacent")
    assert adjacent.score(two) == 0.0
    assert adjacent.score("a large blue blue blue circle and") == pytest.approx(-2 / 7)
    with pytest.raises(ValueError, match="word_repeats must be one of"):
        RepetitionPenalty(word_repeats="some")
    with pytest.raises(ValueError):
        RepetitionPenalty(n=1)


def test_repetition_rate():
    caps = ["red red red", "a b c"]
    assert repetition_rate(caps) == pytest.approx((1 / 2 + 0) / 2)  # bigrams by default
    assert repetition_rate(caps, n=1) == pytest.approx((2 / 3 + 0) / 2)
    assert repetition_rate(["a red, a red"], n=1) == pytest.approx(2 / 4)  # nothing ignored
    assert repetition_rate([]) == 0.0


def test_length_reward():
    caps = ["a red circle.", "", "one two three four five"]
    assert LengthReward().name == "length"
    assert vals(LengthReward()(None, caps)) == [3, 0, 5]
    assert vals(LengthReward(target_words=4)(None, caps)) == [-1, -4, -1]
