"""w8a16.course.detection: the comparisons notebook 04 prints, on hand-made outputs whose answers are known."""

from types import SimpleNamespace

import pytest
import torch

from w8a16.course.detection import logits_change, output_difference, query_spread, response_change


def outputs(logits, boxes=None):
    logits = torch.as_tensor(logits, dtype=torch.float32)[None]
    boxes = torch.full((*logits.shape[:2], 4), 0.5) if boxes is None else torch.as_tensor(boxes)[None]
    return SimpleNamespace(logits=logits, pred_boxes=boxes)


def test_query_spread_is_zero_for_copies_and_not_for_distinct_queries():
    assert query_spread(outputs([[1.0, 2.0, 0.0]] * 4)) == 0
    assert query_spread(outputs([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(2 ** -0.5)  # deviations ±0.5, norm 1


def test_logits_change_and_response_change():
    a, b = outputs([[3.0, 4.0]]), outputs([[3.0, 4.5]])
    assert logits_change(a, b) == pytest.approx(0.5 / 5)
    a_moved = outputs([[3.0, 5.0]])
    assert response_change(a, a_moved, a, a_moved) == 0  # same reaction
    assert response_change(a, a_moved, b, b) == pytest.approx(1.0)  # no reaction at all
    assert response_change(a, a_moved, b, outputs([[3.0, 5.5]])) == pytest.approx(0.0)  # offset, same reaction


def test_same_top_class_says_when_it_carries_no_information():
    copies = outputs([[0.0, 1.0, 0.0]] * 3)
    diff = output_difference(copies, copies, (100, 50))
    assert diff.same_top_class == 1 and diff.distinct_top_classes == 1
    assert "one decision counted many times" in str(diff)
    distinct = outputs([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    diff = output_difference(distinct, distinct, (100, 50))
    assert diff.distinct_top_classes == 3 and "one decision" not in str(diff)
