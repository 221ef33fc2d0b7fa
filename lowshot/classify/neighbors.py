"""The neighbour classifiers beside the logistic probe, on the same row-centred + L2-normalised features, as
scikit-learn classifiers.

- ``KNNClassifier``: the k most cosine-similar training images vote; k is chosen by leave-one-out on the labelled
  training subset only (never the test labels). With one image per class leave-one-out is impossible: k = 1.
- ``NearestClassMean``: the class whose mean training feature (re-normalised) is most cosine-similar.

They show how much the trained probe adds over a classifier with nothing to fit.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

from lowshot.classify.base import EstimatorInputError, ScoreClassifier

KNN_K_GRID = (1, 3, 5, 10, 20)  # candidates for leave-one-out; 20 is DINO's k-NN default with all labels
_BATCH = 4096  # test rows per similarity block (4,096 x 13,000 float32 = 213 MB for ImageNet 1%)


def _votes(top_sim: torch.Tensor, top_codes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Majority vote of the k most similar items, given their similarities and classes (m, k), most similar first;
    ties go to the class with the larger summed similarity.

    Each class scores ``count + sum_sim / (2k + 1)``: the similarity term lies in (-1/2, 1/2), so it only decides
    between classes with equal counts."""
    k = top_sim.shape[1]
    scores = torch.zeros(top_sim.shape[0], n_classes, dtype=torch.float64)
    scores.scatter_add_(1, top_codes, torch.ones_like(top_sim, dtype=torch.float64))
    scores.scatter_add_(1, top_codes, top_sim.to(torch.float64) / (2 * k + 1))
    return scores


def leave_one_out_k(x: torch.Tensor, codes: np.ndarray, *, grid: Sequence[int] = KNN_K_GRID
                    ) -> tuple[int, dict[int, float] | None]:
    """Choose k by leave-one-out accuracy on the labelled training subset (rows already prepared).

    Candidates are the grid values below the subset size. A class with a single image cannot be held out and
    still be predicted, so with one image per class (1-shot) the answer is k = 1 with ``None`` scores.
    Ties go to the smaller k."""
    counts = np.bincount(codes)
    candidates = sorted({k for k in grid if 1 <= k < len(codes)})
    if counts.min() < 2 or not candidates:
        return 1, None
    y = torch.as_tensor(codes)
    k_max = candidates[-1]
    hits = dict.fromkeys(candidates, 0)
    for start in range(0, len(codes), _BATCH):
        block = x[start:start + _BATCH] @ x.T
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = -torch.inf  # leave each item out of its own vote
        top_sim, top_idx = block.topk(k_max, dim=1)
        top_codes = y[top_idx]
        for k in candidates:
            pred = _votes(top_sim[:, :k], top_codes[:, :k], len(counts)).argmax(dim=1)
            hits[k] += int((pred == y[start:start + _BATCH]).sum())
    scores = {k: hits[k] / len(codes) for k in candidates}
    best = max(candidates, key=lambda k: (scores[k], -k))
    return best, scores


class KNNClassifier(ScoreClassifier):
    """k nearest neighbours by cosine similarity, majority vote; a scikit-learn classifier.

    ``k="auto"`` (default) picks k by leave-one-out on the training data given to ``fit`` (``k_``, with the
    candidates' accuracies in ``loo_scores_``) among ``k_grid``; an int fixes it (at most the training size).
    ``preprocess=False`` when rows are already centred and L2-normalised. ``class_scores`` are each class's votes
    plus a similarity tie-break (see ``_votes``)."""

    def __init__(self, k: int | str = "auto", *, k_grid: Sequence[int] = KNN_K_GRID, preprocess: bool = True):
        self.k = k
        self.k_grid = k_grid
        self.preprocess = preprocess

    def fit(self, x, y) -> KNNClassifier:
        if self.k != "auto" and not _positive_int(self.k):
            raise EstimatorInputError(f"k {self.k!r}: expected a positive integer or 'auto'")
        if self.k == "auto" and not (len(self.k_grid) and all(_positive_int(k) for k in self.k_grid)):
            raise EstimatorInputError(f"k_grid {self.k_grid!r}: expected positive integers")
        self.x_, codes = self._fit_rows(x, y)
        self.codes_ = torch.as_tensor(codes)
        if self.k == "auto":
            self.k_, self.loo_scores_ = leave_one_out_k(self.x_, codes, grid=tuple(int(k) for k in self.k_grid))
        else:
            self.k_, self.loo_scores_ = min(int(self.k), len(codes)), None
        return self

    def _scores(self, rows: torch.Tensor) -> np.ndarray:
        blocks = []
        for start in range(0, len(rows), _BATCH):
            top_sim, top_idx = (rows[start:start + _BATCH] @ self.x_.T).topk(self.k_, dim=1)
            blocks.append(_votes(top_sim, self.codes_[top_idx], len(self.classes_)))
        return torch.cat(blocks).numpy()


def _positive_int(k) -> bool:
    return isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1


class NearestClassMean(ScoreClassifier):
    """The class whose mean training feature is most cosine-similar (means re-normalised to unit length); a
    scikit-learn classifier."""

    def __init__(self, *, preprocess: bool = True):
        self.preprocess = preprocess

    def fit(self, x, y) -> NearestClassMean:
        xt, codes = self._fit_rows(x, y)
        codes = torch.as_tensor(codes)
        means = torch.zeros(len(self.classes_), xt.shape[1]).index_add_(0, codes, xt)
        means /= torch.bincount(codes, minlength=len(self.classes_)).unsqueeze(1).to(means.dtype)
        self.means_ = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self

    def _scores(self, rows: torch.Tensor) -> np.ndarray:
        return (rows @ self.means_.T).numpy()
