"""The draft model's state at each step, for AdaEAGLE's learned draft length (core/length_predictor.py).

A step's features: the drafter's normed last-layer hidden state at the newest context token and that
token's input embedding ([2 * hidden]). The hidden state comes out of the forward that feeds the newest
token anyway (the first forward of a draft): reading it costs no extra forward. With them a session can
- choose the step's draft length with a `LengthPredictor` (draft_length.policy: learned), after that
  first forward and before drafting on; and/or
- log (features, draft length, accepted tokens) rows to a `DraftStateLog` (`launch.py bench
  --log-draft-states`), the predictor's training data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.length_predictor import LengthPredictor
from workers.drafters import EMPTY_DRAFT, Draft, DraftModelDrafter, _DraftModelSession


@dataclass
class DraftStateLog:
    """Rows of (features, drafted, accepted, request), one per model draft verified."""
    features: list[torch.Tensor] = field(default_factory=list)    # each [2 * hidden] float16
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    request: list[int] = field(default_factory=list)              # which request (session) the step was in
    sessions: int = 0

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": torch.stack(self.features) if self.features else torch.zeros(0, 0),
                    "drafted": torch.tensor(self.drafted, dtype=torch.long),
                    "accepted": torch.tensor(self.accepted, dtype=torch.long),
                    "request": torch.tensor(self.request, dtype=torch.long), "meta": dict(meta or {})}, path)


def load_draft_states(path: str | Path) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"features", "drafted", "accepted", "request"} <= set(data):
        raise ValueError(f"{path}: not a draft-state log (`launch.py bench --log-draft-states` writes one)")
    return data


def feature_size(runner) -> int:
    """Features per step for a drafter run by `runner`: its hidden state and an input embedding."""
    return 2 * runner.config.hidden_size


class DraftStateDrafter(DraftModelDrafter):
    """A draft-model drafter (the same runner and settings as `base`) whose sessions read the drafter's
    state each step: `predictor` chooses the draft length in [k_min, k asked] (None: k as asked), and
    `state_log` gets a row per verified model draft (None: nothing logged)."""

    session_class = None    # set below: _DraftStateSession

    def __init__(self, base: DraftModelDrafter, predictor: LengthPredictor | None = None, k_min: int = 0,
                 threshold: float = 0.5, state_log: DraftStateLog | None = None):
        self.__dict__.update(vars(base))      # every setting of the plain drafter, whatever it has
        if predictor is not None and predictor.num_features != feature_size(self.runner):
            raise ValueError(f"the predictor reads {predictor.num_features} features, drafter {self.name!r} "
                             f"gives {feature_size(self.runner)} (2 x hidden size {self.runner.config.hidden_size})")
        self.predictor, self.k_min, self.threshold, self.state_log = predictor, k_min, threshold, state_log

    def start(self, prompt_ids, params, generator):
        session = super().start(prompt_ids, params, generator)
        session.read_state(self)
        return session


class _DraftStateSession(_DraftModelSession):
    _hidden: list | None = None                 # the last forward's normed hidden states (None: the prefill)
    _ready: torch.Tensor | None = None          # first logits computed before the length was chosen
    _step: tuple[torch.Tensor, int] | None = None   # this step's (features, tokens drafted), logged at update

    def read_state(self, owner: DraftStateDrafter) -> None:
        self.owner, self.request, self._hidden = owner, None, []
        if owner.state_log is not None:
            self.request, owner.state_log.sessions = owner.state_log.sessions, owner.state_log.sessions + 1

    def _logits(self, tokens, **forward_kwargs):
        if self._hidden is None:
            return super()._logits(tokens, **forward_kwargs)
        self._hidden.clear()
        return super()._logits(tokens, hidden_out=self._hidden, **forward_kwargs)

    def _first_logits(self) -> torch.Tensor:
        if self._ready is not None:
            logits, self._ready = self._ready, None
            return logits
        return super()._first_logits()

    def features(self) -> torch.Tensor:
        """[2 * hidden] float32: the hidden state at the newest token (read by the last forward) and its embedding."""
        newest = torch.tensor([self.context[-1]], device=self.runner.device)
        with torch.inference_mode():
            embedding = self.runner.embed(newest)[0]                               # [hidden]
        return torch.cat([self._hidden[-1][0, -1], embedding]).float().cpu()

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        self._ready = self._first_logits()        # feeds the newest token: its hidden state is now known
        features, owner = self.features(), self.owner
        if owner.predictor is not None:
            k = min(k, max(owner.k_min, owner.predictor.draft_length(features, owner.threshold)))
        if k <= 0:
            self._ready = None     # the fed token's KV stays valid: the next step starts after it
            return EMPTY_DRAFT
        draft = super().propose(k)
        self._step = (features, len(draft))
        return draft

    def update(self, new_tokens, num_accepted):
        log = self.owner.state_log
        if log is not None and self._step is not None:
            features, drafted = self._step
            log.features.append(features.half())
            log.drafted.append(drafted)
            log.accepted.append(num_accepted)
            log.request.append(self.request)
        self._step = None
        super().update(new_tokens, num_accepted)


DraftStateDrafter.session_class = _DraftStateSession
