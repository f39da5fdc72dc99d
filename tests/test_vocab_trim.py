"""The trimmed drafter head scores exactly the kept ids, dense or int8, and nothing else."""
from __future__ import annotations

import pytest
import torch

from workers.quantize import quantize_linear_int8
from workers.runner import _linear
from workers.vocab_trim import TrimmedHead, kept_token_ids


def test_kept_ids_are_low_ids_plus_prompt_tokens():
    ids = kept_token_ids(100, 10, [3, 50, 50, 99, 7, 200])
    assert ids.tolist() == list(range(10)) + [50, 99]   # 200 is outside the vocabulary


@pytest.mark.parametrize("int8", [False, True])
def test_trimmed_logits_equal_full_logits_on_kept_ids(int8):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    if int8:
        quantize_linear_int8(head)
    x = torch.randn(1, 3, 16, dtype=torch.bfloat16)
    full = _linear(x, head, kernel="weight_major").float()                                  # [1, 3, 40]
    trimmed = TrimmedHead(head, kept_token_ids(40, 8, [20, 33]))
    small = _linear(x, trimmed, kernel="weight_major").float()                              # [1, 3, 10]
    assert small.shape[-1] == 10
    expanded = trimmed.expand(small)                                            # [1, 3, 40]
    kept = torch.tensor(list(range(8)) + [20, 33])
    torch.testing.assert_close(expanded[..., kept], full[..., kept])
    dropped = torch.ones(40, dtype=torch.bool)
    dropped[kept] = False
    assert torch.isinf(expanded[..., dropped]).all() and (expanded[..., dropped] < 0).all()
