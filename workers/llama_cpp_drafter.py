"""A llama.cpp draft model for DuoDecoding's drafter side (workers/duo_drafter.py), through
llama-cpp-python reading the GGUF directly (optional extra: `pip install -e '.[llama]'`).

Same backend interface as `TorchDraftModel`: `new_kv(prompt_len)` gives an object with `fed` (the
tokens whose KV is held), `truncate(n)` and `feed(tokens) -> logits [vocab]`.

- One llama.cpp context serves every session: `fed` is the context's own token list, so a session
  switch is just a rollback to the common prefix (usually a re-prefill; DuoDecoding decodes one
  request at a time per drafter).
- KV rollback: the `Llama` object's `n_tokens` is its valid prefix, and its next `eval()` removes the
  KV cells past it (llama.cpp's sequence-removal call), so truncating is setting `n_tokens`.
- Logits: after `eval()` the context holds the last position's logits (`llama_get_logits_ith(ctx, -1)`);
  they are returned as float32 over the target's vocabulary (ids the GGUF lacks get -inf, i.e. q = 0), so the drafter
  samples from exactly the q that verification is given, and the output stays lossless.
"""
from __future__ import annotations

from pathlib import Path

import torch


def gguf_path(source: str) -> Path:
    """The GGUF file for a model spec: an embedded model name (workers/model_store.py) or a .gguf path."""
    from workers.model_store import EMBEDDED, fetch_gguf

    if source in EMBEDDED:
        return fetch_gguf(EMBEDDED[source])
    path = Path(source).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"backend llama_cpp needs an embedded model name or a .gguf file, got {source!r}")
    return path


class LlamaCppKV:
    def __init__(self, model: "LlamaCppDraftModel"):
        self.model = model

    @property
    def fed(self) -> list[int]:
        return self.model.tokens

    def truncate(self, length: int) -> None:
        self.model.llm.n_tokens = length        # the next eval() drops the KV past it
        del self.model.tokens[length:]

    def feed(self, tokens: list[int]) -> torch.Tensor:
        import numpy as np

        llm = self.model.llm
        llm.eval(tokens)
        self.model.tokens.extend(tokens)
        # Without logits_all, eval() keeps no scores: read the batch's last output row from the context.
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        row = torch.from_numpy(row.copy()).float()                             # [n_vocab]
        if row.numel() == self.model.vocab_size:
            return row
        logits = torch.full((self.model.vocab_size,), float("-inf"))          # [vocab]
        logits[: row.numel()] = row
        return logits


class LlamaCppDraftModel:
    device = torch.device("cpu")
    one_context = True      # DuoDrafterSide runs one draft at a time on it

    def __init__(self, source: str, vocab_size: int, threads: int = 1, n_ctx: int = 4096):
        """vocab_size: the target's (logits are laid out over it)."""
        try:
            from llama_cpp import Llama
        except ImportError:
            raise RuntimeError("backend: llama_cpp needs llama-cpp-python, the optional extra `llama`: "
                               "pip install -e '.[llama]' (builds llama.cpp with cmake)") from None
        self.llm = Llama(model_path=str(gguf_path(source)), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)
        if self.llm.n_vocab() > vocab_size:
            raise ValueError(f"the GGUF's vocabulary ({self.llm.n_vocab()}) is larger than the target's ({vocab_size})")
        self.vocab_size = vocab_size
        self.tokens: list[int] = []

    def new_kv(self, prompt_len: int) -> LlamaCppKV:
        if prompt_len + 256 > self.llm.n_ctx():
            raise ValueError(f"prompt of {prompt_len} tokens exceeds the llama.cpp context ({self.llm.n_ctx()})")
        return LlamaCppKV(self)
