"""EasySpec drafting (ALGORITHMS.md section 1): layer-parallel drafts with KV calibration.

This module is the in-process mode: the members of a layer group are computed
one after another in this process on the same group input, which yields exactly
the approximation parallel workers would (used for tests and for measuring draft
accuracy). Running group members on separate Ray actors joined by a
torch.distributed group is the distributed runtime's part and is not built yet.

Calibration policies (what KV the drafter keeps for accepted tokens):
  NEVER          every draft forward is layer-parallel, prefill included
  PREFILL_ONLY   prefill exact, everything after approximate
  EVERY_ROUND    each round first recomputes, exactly and in layer order, every
                 token since the last exact point (fused with the round's first
                 draft step)
  EVERY_MISMATCH (default) the same, only after a round with a rejection
"""
from __future__ import annotations

from enum import Enum

import torch

from orchestrator.sampling import sample, warp_probs
from workers.drafters import EMPTY_DRAFT, Draft, Drafter, DraftSession
from workers.runner import ModelRunner


class Calibration(str, Enum):
    NEVER = "never"
    PREFILL_ONLY = "prefill_only"
    EVERY_ROUND = "every_round"
    EVERY_MISMATCH = "every_mismatch"


def default_groups(num_layers: int, degree: int, edge: int | None = None) -> list[list[int]]:
    """The paper's bound strategy: the first and last `edge` layers single, the middle fused
    in groups of `degree` (edge defaults to num_layers // 8: 4 of 32 layers, 3 of 24)."""
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    edge = max(1, num_layers // 8) if edge is None else edge
    if 2 * edge >= num_layers:
        return [[i] for i in range(num_layers)]
    middle = list(range(edge, num_layers - edge))
    groups = [[i] for i in range(edge)]
    groups += [middle[i:i + degree] for i in range(0, len(middle), degree)]
    groups += [[i] for i in range(num_layers - edge, num_layers)]
    return groups


class EasySpecDrafter(Drafter):
    def __init__(self, runner: ModelRunner, degree: int = 2, mode: str = "attn_only",
                 calibration: Calibration | str = Calibration.EVERY_MISMATCH,
                 groups: list[list[int]] | None = None, name: str = "easyspec"):
        self.runner, self.mode, self.name = runner, mode, name
        self.calibration = Calibration(calibration)
        self.groups = groups or default_groups(runner.num_layers, degree)
        flat = sorted(li for g in self.groups for li in g)
        if flat != list(range(runner.num_layers)):
            raise ValueError(f"layer groups must cover each of the {runner.num_layers} layers once: {self.groups}")
        if mode not in ("attn_only", "direct_mlp"):
            raise ValueError(f"mode must be attn_only or direct_mlp, got {mode!r}")

    def start(self, prompt_ids, params, generator):
        return _EasySpecSession(self, prompt_ids, params, generator)


class _EasySpecSession(DraftSession):
    def __init__(self, drafter: EasySpecDrafter, prompt_ids, params, generator):
        super().__init__(prompt_ids)
        self.d, self.params, self.generator = drafter, params, generator
        self.runner = drafter.runner
        self.cache = self.runner.new_cache(1, capacity=len(prompt_ids) + 256)
        exact_prefill = drafter.calibration != Calibration.NEVER
        self._forward(list(prompt_ids), exact=exact_prefill)
        self.exact_len = len(prompt_ids) if exact_prefill else 0   # KV of context[:exact_len] is exact
        self.mismatch = False
        self.last_k = 0

    def _forward(self, tokens: list[int], exact: bool) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.runner.device)
        groups = None if exact else self.d.groups
        return self.runner.forward(self.cache, ids, logits_rows=slice(-1, None), layer_groups=groups,
                                   group_mode=self.d.mode)[0, -1]

    def _calibrate_now(self) -> bool:
        c = self.d.calibration
        return c == Calibration.EVERY_ROUND or (c == Calibration.EVERY_MISMATCH and self.mismatch)

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        if self._calibrate_now() and self.exact_len < len(self.context):
            # Crop to the last exact point; recompute since then in layer order, fused with the first draft step.
            self.cache.crop(0, self.exact_len)
            logits = self._forward(self.context[self.exact_len:], exact=True)
            self.exact_len = len(self.context)
        else:
            logits = self._forward(self.context[self.cache.lengths[0]:], exact=False)
        self.mismatch = False
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if self.params.greedy:
                tok = logits.argmax()
            else:
                q = warp_probs(logits, self.params)                        # [vocab]
                probs.append(q)
                tok = sample(q, self.generator)
            tokens.append(int(tok))
            if i + 1 < k:
                logits = self._forward([int(tok)], exact=False)
        self.last_k = len(tokens)
        return Draft(tokens=tokens, probs=torch.stack(probs) if probs else None)

    def update(self, new_tokens, num_accepted):
        committed_before = len(self.context)
        super().update(new_tokens, num_accepted)
        valid = min(self.cache.lengths[0], committed_before + num_accepted)
        self.cache.crop(0, valid)
        self.exact_len = min(self.exact_len, valid)
        self.mismatch = self.mismatch or num_accepted < self.last_k   # a draft token was rejected
        self.last_k = 0

    def close(self):
        self.cache = None
