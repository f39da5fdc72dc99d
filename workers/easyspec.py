"""EasySpec drafting (ALGORITHMS.md section 1): layer-parallel drafts with KV calibration.

This module is the in-process mode: the members of a layer group are computed
one after another in this process on the same group input, which yields exactly
the approximation parallel workers would (used for tests and for measuring draft
accuracy). workers/easyspec_workers.py runs the same sessions on N Ray actors
joined by a torch.distributed group: each rank's drafter gets an `exchange`
(how group members' outputs are gathered, how the sampled token is shared), and
the layer math stays in ModelRunner._grouped_layers for both modes.

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

from workers.drafters import Draft, Drafter, _DraftModelSession
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
                 groups: list[list[int]] | None = None, name: str = "easyspec", exchange=None):
        """exchange: None in process; across workers an object with `rank`, `members(group, compute,
        hidden)` (every member's output, in group order) and `share_token(tok)` (rank 0's token on
        every rank; only rank 0 computes logits and samples)."""
        self.runner, self.mode, self.name, self.exchange = runner, mode, name, exchange
        self.calibration = Calibration(calibration)
        self.groups = groups or default_groups(runner.num_layers, degree)
        flat = sorted(li for g in self.groups for li in g)
        if flat != list(range(runner.num_layers)):
            raise ValueError(f"layer groups must cover each of the {runner.num_layers} layers once: {self.groups}")
        if mode not in ("attn_only", "direct_mlp"):
            raise ValueError(f"mode must be attn_only or direct_mlp, got {mode!r}")

    def start(self, prompt_ids, params, generator):
        return _EasySpecSession(self, prompt_ids, params, generator)


class _NoHead(torch.nn.Linear):
    """A one-logit output head for ranks that never sample (weight and bias read by ModelRunner's _linear)."""

    def __init__(self, runner: ModelRunner):
        super().__init__(runner.config.hidden_size, 1, bias=False, device=runner.device, dtype=runner.dtype)
        self.requires_grad_(False)

    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class _EasySpecSession(_DraftModelSession):
    """Draft-model drafting whose forwards are layer-parallel, with KV calibration."""

    def __init__(self, drafter: EasySpecDrafter, prompt_ids, params, generator):
        self.d = drafter
        self.mismatch = False
        self.last_k = 0
        super().__init__(drafter.runner, prompt_ids, params, generator)
        self.exact_len = len(prompt_ids) if self._exact_prefill else 0   # KV of context[:exact_len] is exact

    @property
    def _exact_prefill(self) -> bool:
        return self.d.calibration != Calibration.NEVER

    def _approx(self, tokens: torch.Tensor) -> torch.Tensor:
        exchange = self.d.exchange.members if self.d.exchange is not None else None
        return self._logits(tokens, layer_groups=self.d.groups, group_mode=self.d.mode, group_exchange=exchange)

    def _prefill(self, prompt_ids):
        if self.d.exchange is not None and self.d.exchange.rank != 0:
            # Only rank 0 samples: the others skip the output head, a quarter of a small drafter's weights.
            self.head = _NoHead(self.runner)
        ids = torch.tensor([prompt_ids], device=self.runner.device)
        if self._exact_prefill:
            self._logits(ids)
        else:
            self._approx(ids)

    def _first_logits(self):
        c = self.d.calibration
        calibrate = c == Calibration.EVERY_ROUND or (c == Calibration.EVERY_MISMATCH and self.mismatch)
        self.mismatch = False
        if calibrate and self.exact_len < len(self.context):
            # Crop to the last exact point; recompute since then in layer order, fused with the first draft step.
            self.cache.crop(0, self.exact_len)
            logits = self._logits(torch.tensor([self.context[self.exact_len:]], device=self.runner.device))
            self.exact_len = len(self.context)
            return logits
        return self._approx(torch.tensor([self.context[self.cache.lengths[0]:]], device=self.runner.device))

    def _next_logits(self, token):
        return self._approx(token.view(1, 1))

    def _choose(self, logits):
        exchange = self.d.exchange
        if exchange is None:
            return super()._choose(logits)
        if exchange.rank == 0:
            tok, q, confidence = super()._choose(logits)
        else:   # its logits are a stub (see _prefill); the token comes from rank 0
            tok, q, confidence = torch.zeros((), dtype=torch.long, device=logits.device), None, None
        # Every rank feeds rank 0's token, so their KV stays in sync.
        return exchange.share_token(tok), q, confidence

    def propose(self, k: int) -> Draft:
        draft = super().propose(k)
        self.last_k = len(draft)
        return draft

    def update(self, new_tokens, num_accepted):
        super().update(new_tokens, num_accepted)
        self.exact_len = min(self.exact_len, self.cache.lengths[0])
        self.mismatch = self.mismatch or num_accepted < self.last_k   # a draft token was rejected
        self.last_k = 0
