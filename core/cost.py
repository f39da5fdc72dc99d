"""CS-Drafting's cost model (arXiv 2312.11462): a forward costs its model's parameter count.

Decoding cost of a request, in target forwards: steps (one target forward each)
+ draft_cost (drafter forwards x drafter parameters / target parameters; MaG and
prompt lookup cost 0). Plain decoding makes one target forward per token, so
cost speedup vs plain = tokens added by steps / (steps + draft_cost); prefills
are left out on both sides. Wall clock is measured beside it, never replaced.
"""
from __future__ import annotations

import weakref

_COUNTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def parameter_count(model) -> int | None:
    """Parameters of a torch model, int8-quantized weights (workers/quantize.py) included; None for None."""
    if model is None or not hasattr(model, "parameters"):
        return None
    if model not in _COUNTS:
        params = sum(p.numel() for p in model.parameters())
        _COUNTS[model] = params + sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight_int8"))
    return _COUNTS[model]


def draft_cost(drafter, session, model_drafted: int, target_params: int | None) -> tuple[float | None, dict]:
    """(draft cost in target forwards or None when unknown, forwards per drafter level).

    session: the request's DraftSession (None without a drafter). Sessions that count
    their own forwards expose `forward_params` and `forwards_by_level` (the cascade);
    a drafter with a `runner` drafts one forward per token, estimated from
    `model_drafted` (tokens of drafts it made itself, copied lookup drafts excluded).
    """
    if drafter is None:
        return 0.0, {}
    if getattr(drafter, "deterministic", False):
        return 0.0, {}
    if target_params is None or session is None:
        return None, {}
    if hasattr(session, "forward_params"):
        return session.forward_params / target_params, dict(session.forwards_by_level)
    model = getattr(drafter, "model", drafter)          # LookupThenModelDrafter wraps the model drafter
    params = parameter_count(getattr(getattr(model, "runner", None), "model", None))
    if params is None:
        return None, {}
    return model_drafted * params / target_params, {getattr(model, "name", "drafter"): model_drafted}
