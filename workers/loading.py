"""Loading a model for decoding: the device, the dtype, optional int8 weights and huge pages, and the
ids that end a sequence (shared by the in-process build, the actors and the scripts)."""
from __future__ import annotations

import torch

from workers.hugepages import move_to_hugepages
from workers.model_store import load_model
from workers.quantize import quantize_model_int8

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def load_for_decoding(source: str, dtype: str, device: torch.device, quantize: str = "none",
                      with_tokenizer: bool = True):
    model, tokenizer = load_model(source, DTYPES[dtype], device, with_tokenizer=with_tokenizer)
    if quantize == "int8":
        if device.type != "cpu":
            raise ValueError("quantize: int8 is implemented for CPU drafters only")
        quantize_model_int8(model)
    if device.type == "cpu":
        move_to_hugepages(model)   # see workers/hugepages.py: ~1.4x faster decode steps here
    return model, tokenizer
