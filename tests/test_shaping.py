import numpy as np
import pytest

from server.shaping import Granularity

CLASSES = [f"c{i}" for i in range(5)]
PROBS = np.array(
    [[0.05, 0.6123456, 0.2, 0.1, 0.0376544], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=np.float32
)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("probs", "probs"),
        ("label", "label"),
        ("topk:3", "topk:3"),
        ("round:2", "round:2"),
        ("round:2,topk:3", "topk:3,round:2"),
        (" TopK:1 , round:0 ", "topk:1,round:0"),
    ],
)
def test_parse_canonical(spec: str, canonical: str) -> None:
    assert str(Granularity.parse(spec)) == canonical


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "bogus",
        "topk",
        "topk:0",
        "topk:-1",
        "round:x",
        "round:9",
        "label,topk:3",
        "probs,round:2",
        "topk:2,topk:3",
        "label:1",
    ],
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        Granularity.parse(spec)


def shape(spec: str):
    return Granularity.parse(spec).shape(PROBS, CLASSES, ["q0", "q1"])


def test_probs_full_vector_sorted_highest_first() -> None:
    first = shape("probs")[0]
    assert first.label == 1 and first.label_name == "c1" and first.query_id == "q0"
    assert [s.index for s in first.scores] == [1, 2, 3, 0, 4]
    assert sum(s.prob for s in first.scores) == pytest.approx(1.0, abs=1e-6)
    assert [s.name for s in first.scores] == ["c1", "c2", "c3", "c0", "c4"]


def test_topk_keeps_k_most_probable() -> None:
    first = shape("topk:2")[0]
    assert [s.index for s in first.scores] == [1, 2]


def test_ties_broken_by_class_index() -> None:
    second = shape("topk:3")[1]
    assert second.label == 0
    assert [s.index for s in second.scores] == [0, 1, 2]


def test_round_rounds_but_label_uses_unrounded_vector() -> None:
    first = shape("round:1")[0]
    assert [s.prob for s in first.scores] == [0.6, 0.2, 0.1, 0.1, 0.0]
    probs = np.array([[0.5004, 0.4996]], dtype=np.float32)
    only = Granularity.parse("round:2").shape(probs, ["a", "b"], ["q"])[0]
    assert only.label == 0
    assert [s.prob for s in only.scores] == [0.5, 0.5]


def test_label_reveals_no_score() -> None:
    first = shape("label")[0]
    assert first.scores is None
    assert (first.label, first.label_name) == (1, "c1")


def test_composed_topk_and_round() -> None:
    first = shape("topk:2,round:2")[0]
    assert [(s.index, s.prob) for s in first.scores] == [(1, 0.61), (2, 0.2)]
