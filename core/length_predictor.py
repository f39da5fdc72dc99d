"""AdaEAGLE's draft-length predictor: a small MLP maps the drafter's state to the next draft's length.

Features (workers/draft_states.py): the draft model's last-layer hidden state (after its final norm) at
the newest context token, concatenated with that token's input embedding. AdaEAGLE reads the target's
hidden state; the drafter's is used here because the drafter computes it anyway in its first forward of
a step (no extra target pass). Label: the draft tokens the target accepted at that step when the drafter
drafted `k_max` tokens; a whole acceptance is censored at `k_max` ("k_max or more").

The MLP classifies the accepted length over 0..k_max (cross-entropy). The draft length is read from the
predicted distribution as: draft position j while P(accepted >= j) >= `threshold` (0.5: the predicted
median, which minimises the absolute error). Only the draft length changes, never what is accepted: every
draft is verified, so the output stays the target's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class LengthPredictor:
    w1: torch.Tensor            # [num_features, hidden]
    b1: torch.Tensor            # [hidden]
    w2: torch.Tensor            # [hidden, k_max + 1]
    b2: torch.Tensor            # [k_max + 1]
    mean: torch.Tensor          # [num_features] feature standardisation
    std: torch.Tensor           # [num_features]
    meta: dict = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return self.w1.shape[0]

    @property
    def k_max(self) -> int:
        return self.w2.shape[1] - 1

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, num_features] -> logits over accepted lengths 0..k_max [n, k_max + 1]."""
        x = (features.float() - self.mean) / self.std
        return F.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def draft_length(self, features: torch.Tensor, threshold: float = 0.5) -> int:
        """features [num_features] -> tokens to draft: positions j in 1..k_max with P(accepted >= j) >= threshold."""
        return int(lengths_from_logits(self.logits(features[None]), threshold)[0])


def lengths_from_logits(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """logits [n, k_max + 1] -> draft lengths [n] long (how many j >= 1 have P(accepted >= j) >= threshold)."""
    probs = torch.softmax(logits, -1)
    at_least = probs.flip(-1).cumsum(-1).flip(-1)[:, 1:]        # [n, k_max]: P(accepted >= j), j = 1..k_max
    return (at_least >= threshold).sum(-1)


def init_predictor(num_features: int, k_max: int, hidden: int, generator: torch.Generator) -> LengthPredictor:
    def uniform(rows, cols):         # PyTorch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        return (torch.rand(rows, cols, generator=generator) * 2 - 1) / rows ** 0.5
    return LengthPredictor(uniform(num_features, hidden), torch.zeros(hidden), uniform(hidden, k_max + 1),
                           torch.zeros(k_max + 1), torch.zeros(num_features), torch.ones(num_features))


@dataclass
class TrainReport:
    train_rows: int
    val_rows: int
    val_loss: float             # cross-entropy of the MLP on the validation rows
    baseline_loss: float        # cross-entropy of the training labels' frequencies (a constant predictor)
    val_accuracy: float         # argmax class == label
    baseline_accuracy: float    # the training set's most common label
    val_mae: float              # |draft length (threshold 0.5) - label|
    baseline_mae: float         # |the training labels' median - label|: the best constant k for this metric


def train_predictor(features: torch.Tensor, labels: torch.Tensor, val_mask: torch.Tensor, k_max: int,
                    hidden: int = 64, epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-2,
                    seed: int = 0) -> tuple[LengthPredictor, TrainReport]:
    """Full-batch AdamW on cross-entropy. features [n, f] float, labels [n] long in 0..k_max, val_mask [n]
    bool (held-out rows: split by request, as steps of one request are alike). Returns the weights of the
    epoch with the lowest validation loss and how they compare with constant predictors."""
    train_x, train_y = features[~val_mask].float(), labels[~val_mask]
    val_x, val_y = features[val_mask].float(), labels[val_mask]
    if not len(train_y) or not len(val_y):
        raise ValueError(f"need training and validation rows, got {len(train_y)} and {len(val_y)}")
    gen = torch.Generator().manual_seed(seed)
    model = init_predictor(features.shape[1], k_max, hidden, gen)
    model.mean, model.std = train_x.mean(0), train_x.std(0).clamp_min(1e-4)
    counts = torch.bincount(train_y, minlength=k_max + 1).float() + 1e-3      # [k_max + 1]
    # Start at the constant predictor (the label frequencies), so training moves away from it only as
    # far as the data supports (a few hundred logged steps against 2 x hidden features).
    model.b2, model.w2 = counts.log() - counts.log().mean(), model.w2 * 0.1
    params = [model.w1, model.b1, model.w2, model.b2]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best, best_loss = None, float("inf")
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model.logits(train_x), train_y).backward()
        opt.step()
        with torch.no_grad():
            loss = float(F.cross_entropy(model.logits(val_x), val_y))
        if loss < best_loss:
            best, best_loss = [p.detach().clone() for p in params], loss
    trained = LengthPredictor(*best, model.mean, model.std, {"k_max": k_max, "hidden": hidden})
    constant = counts.log()[None].expand(len(val_y), -1)
    with torch.no_grad():
        val_logits = trained.logits(val_x)
        lengths = lengths_from_logits(val_logits, 0.5)
    median = int(train_y.float().median())
    report = TrainReport(
        train_rows=len(train_y), val_rows=len(val_y), val_loss=best_loss,
        baseline_loss=float(F.cross_entropy(constant, val_y)),
        val_accuracy=float((val_logits.argmax(-1) == val_y).float().mean()),
        baseline_accuracy=float((val_y == int(counts.argmax())).float().mean()),
        val_mae=float((lengths - val_y).abs().float().mean()),
        baseline_mae=float((val_y - median).abs().float().mean()))
    return trained, report


_TENSORS = ("w1", "b1", "w2", "b2", "mean", "std")


def save_predictor(predictor: LengthPredictor, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({**{k: getattr(predictor, k).float().contiguous() for k in _TENSORS}, "meta": predictor.meta}, path)


def load_predictor(path: str | Path) -> LengthPredictor:
    """Raises FileNotFoundError, or ValueError naming the file when it is not a predictor's weights."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not set(_TENSORS) <= set(data):
        raise ValueError(f"{path}: not draft-length predictor weights (`launch.py train-draft-length` writes them)")
    p = LengthPredictor(*(data[k].float() for k in _TENSORS), dict(data.get("meta") or {}))
    f, h = p.w1.shape
    if (p.b1.shape != (h,) or p.w2.shape[0] != h or p.b2.shape != (p.w2.shape[1],)
            or p.mean.shape != (f,) or p.std.shape != (f,)):
        raise ValueError(f"{path}: inconsistent predictor shapes {[tuple(data[k].shape) for k in _TENSORS]}")
    return p
