"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitdelta_core.errors import DataError
from bitdelta_core.evaluate import accuracy, f1_score, matthews_corrcoef, pearson, task_metric

PRED = [1, 1, 0, 0, 1]
GOLD = [1, 0, 0, 1, 1]  # TP=2 (0,4), FP=1 (1), TN=1 (2), FN=1 (3)


def test_binary_metrics_by_hand():
    assert accuracy(PRED, GOLD) == pytest.approx(3 / 5)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx(1 / 6)
    # 2TP / (2TP + FP + FN) = 4/6
    assert f1_score(PRED, GOLD) == pytest.approx(2 / 3)
    assert matthews_corrcoef(GOLD, GOLD) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - g for g in GOLD], GOLD) == pytest.approx(-1.0)


def test_multiclass_mcc_by_hand():
    # confusion (true, pred): (0,0) (1,1) (1,2) (2,0); t=[1,2,1], p=[2,1,1], n=4, correct=2
    # (2*4 - 5) / (sqrt(16 - 6) * sqrt(16 - 6)) = 3/10
    assert matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)


def test_pearson_by_hand():
    # x-mean = [-1,0,1], y-mean = [-4/3,-1/3,5/3]: r = 3 / sqrt(2 * 42/9)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_undefined_cases_are_zero():
    assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0
    assert f1_score([0, 0], [0, 0]) == 0.0
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_task_metric_dispatch_and_errors():
    assert task_metric("mcc", np.array(PRED), np.array(GOLD)) == pytest.approx(1 / 6)
    with pytest.raises(DataError, match="unknown metric"):
        task_metric("bleu", PRED, GOLD)
    with pytest.raises(DataError, match="same length"):
        accuracy([1, 0], [1])
