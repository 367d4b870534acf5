import pytest
import torch

from vlrm.metrics import color_word_rate, mean_words, retrieval_recall


def test_recall_hand_computed():
    sim = torch.tensor([[0.9, 0.1, 0.2],   # query 0: target 0 ranked 1st
                        [0.5, 0.4, 0.1],   # query 1: target 1 ranked 2nd
                        [0.3, 0.2, 0.1]])  # query 2: target 2 ranked 3rd
    r = retrieval_recall(sim, torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    assert r[1] == pytest.approx(1 / 3)
    assert r[2] == pytest.approx(2 / 3)
    assert r[3] == pytest.approx(1.0)


def test_recall_ties_are_expected_value_of_random_order():
    # target tied with 3 others at the top: P(top1) = 1/4, P(top2) = 2/4
    sim = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    r = retrieval_recall(sim, torch.tensor([0]), ks=(1, 2, 5))
    assert r[1] == pytest.approx(0.25)
    assert r[2] == pytest.approx(0.5)
    assert r[5] == pytest.approx(1.0)
    # one strictly better item and one tie: P(top1)=0, P(top2)=1/2
    sim = torch.tensor([[0.5, 0.9, 0.5]])
    r = retrieval_recall(sim, torch.tensor([0]), ks=(1, 2))
    assert r[1] == 0 and r[2] == pytest.approx(0.5)
    # constant scores over G items give k/G
    r = retrieval_recall(torch.zeros(10, 10), torch.arange(10), ks=(1, 5))
    assert r[1] == pytest.approx(0.1) and r[5] == pytest.approx(0.5)


def test_length_and_colour_rate():
    caps = ["a red circle", "two shapes on a gray background"]
    assert mean_words(caps) == pytest.approx((3 + 6) / 2)
    assert color_word_rate(caps) == pytest.approx(2 / 9)
