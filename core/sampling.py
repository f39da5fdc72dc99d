"""Sampling parameters and the logits -> probabilities warp shared by target and draft.

Lossless speculative sampling needs the target distribution ``p`` and the draft distribution ``q``
to be warped by exactly the same rule (temperature, then top-k, then top-p), so both sides call
:func:`warp_probs` with the same :class:`SamplingParams`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):  # also false for NaN
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Logits -> warped probabilities: temperature, then top-k, then top-p (nucleus).

    logits: [..., vocab], any float dtype. Returns float32 [..., vocab].
    Greedy returns the one-hot of the argmax (ties -> lowest index, as torch.argmax).
    Top-k keeps exactly k tokens; ties at the cut are broken towards the lower index (stable sort),
    so target and draft always agree on the kept set.
    Top-p keeps the smallest prefix of the sorted tokens whose mass reaches top_p (at least one token),
    measured on the distribution left after top-k.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), vocab).float()

    # Shift by the max first: softmax is shift-invariant, and a tiny temperature then sends the
    # other logits to -inf instead of overflowing every logit to inf (NaN probabilities).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    top_k = params.top_k if params.top_k < vocab else 0
    if top_k == 0 and params.top_p >= 1.0:
        return logits.softmax(dim=-1)

    # Filter in sorted order, then scatter back; one sort serves both filters.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [..., vocab] each
    if top_k:
        sorted_logits[..., top_k:] = -math.inf
    if params.top_p < 1.0:
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # exclusive cumsum; 0 for the top token
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, -math.inf)
    warped = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return warped.softmax(dim=-1)


#: The random streams of one request, one per role. Each is derived from the request's seed on its own
#: (numpy's SeedSequence with the role as spawn key), so no two roles ever draw the same numbers: a
#: drafter whose stream equalled the verifier's would correlate its draft with the acceptance test
#: and the target's own samples, and the output would no longer follow the target's distribution.
STREAM_ROLES = ("verifier", "drafter")


def stream_seed(seed: int, role: str) -> int:
    """The seed of `role`'s stream for a request seeded with `seed` (a 63-bit int, independent per role)."""
    import numpy as np

    key = STREAM_ROLES.index(role)      # a ValueError names an unknown role
    state = np.random.SeedSequence(entropy=seed, spawn_key=(key,)).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def make_generator(seed: int | None, device: str | torch.device = "cpu", *,
                   role: str) -> torch.Generator | None:
    """`role`'s generator for a request seeded with ``seed`` (see STREAM_ROLES), on ``device``; None
    (use this process's global RNG) when the request has no seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, role))
    return generator


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token per distribution. probs: [..., vocab] (need not be normalised) -> [...] long."""
    rows = probs.reshape(-1, probs.shape[-1])  # [rows, vocab]
    tokens = torch.multinomial(rows, num_samples=1, generator=generator)  # [rows, 1]
    return tokens.reshape(probs.shape[:-1])
