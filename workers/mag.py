"""MaG: CS-Drafting's statistical drafter at the bottom of a cascade (ALGORITHMS.md section 3).

A MaG draft is deterministic (one-hot q): copy the continuation of the longest
suffix match in the context (prompt + output so far + any draft tokens above),
then fill the remaining positions by walking a bigram "most likely next token"
table. Its cost is ~0, so the neural levels above it only review.

The table comes from text the target generated (`python launch.py mag-table`,
orchestrator/mag_table.py) and is stored sparse: the tokens that were followed by
something (`src`, sorted) and their most frequent successor (`dst`). Without a
table, a table built from the request's own committed context is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workers.drafters import EMPTY_DRAFT, Draft, Drafter, DraftSession, find_ngram_continuations


@dataclass(frozen=True)
class BigramTable:
    """For each token that had a successor, its most frequent one (ties -> the lowest id)."""

    src: torch.Tensor   # [entries] long, sorted ascending, unique
    dst: torch.Tensor   # [entries] long, dst[i] followed src[i] most often

    def next_token(self, token: int) -> int:
        """The most likely successor of `token`, or -1 when the table never saw it followed."""
        i = int(torch.searchsorted(self.src, token))
        return int(self.dst[i]) if i < self.src.numel() and int(self.src[i]) == token else -1

    def __len__(self) -> int:
        return self.src.numel()


EMPTY_TABLE = BigramTable(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def build_bigram_table(sequences: list[torch.Tensor]) -> BigramTable:
    """Count bigrams (within each sequence) and keep each token's most frequent successor.

    sequences: token id tensors [length_i] long. Vectorised: pairs are encoded as
    one int64 key, counted with unique, then the best successor per source is the
    first row after sorting by (source, count desc, successor).
    """
    pairs = [torch.stack([s[:-1], s[1:]], dim=1) for s in sequences if s.numel() > 1]   # [length_i - 1, 2]
    if not pairs:
        return EMPTY_TABLE
    pairs_all = torch.cat(pairs).long()                                                 # [n, 2]
    base = int(pairs_all.max()) + 1
    keys, counts = torch.unique(pairs_all[:, 0] * base + pairs_all[:, 1], return_counts=True)  # [u] sorted by (src, dst)
    src, dst = keys // base, keys % base
    # Stable sorts from the least to the most significant key: dst (already ascending), count desc, src.
    order = torch.sort(-counts, stable=True).indices
    order = order[torch.sort(src[order], stable=True).indices]
    src, dst = src[order], dst[order]                                                   # [u]
    first = torch.ones_like(src, dtype=torch.bool)
    first[1:] = src[1:] != src[:-1]                                                      # best row of each src
    return BigramTable(src[first].contiguous(), dst[first].contiguous())


def save_table(table: BigramTable, path: str | Path, meta: dict | None = None) -> None:
    """int32 on disk: ~8 bytes per entry (<= 1.2 MB for a 150k vocabulary)."""
    torch.save({"src": table.src.int(), "dst": table.dst.int(), "meta": meta or {}}, path)


def load_table(path: str | Path) -> BigramTable:
    data = torch.load(path, map_location="cpu", weights_only=True)
    src, dst = data["src"].long(), data["dst"].long()
    if src.shape != dst.shape or (src.numel() > 1 and not bool((src[1:] > src[:-1]).all())):
        raise ValueError(f"{path}: not a MaG bigram table (src must be sorted and unique, dst the same shape)")
    return BigramTable(src, dst)


def mag_draft(context: torch.Tensor, k: int, tables: list[BigramTable], max_ngram: int,
              min_ngram: int = 1) -> list[int]:
    """Up to k tokens continuing `context` [length] long: the longest suffix match's continuation,
    then a walk of the first table that knows the last token (stops early when none does)."""
    if k <= 0 or context.numel() == 0:
        return []
    found = find_ngram_continuations(context, k, max_ngram, min_ngram)
    out = list(found[0]) if found else []
    last = out[-1] if out else int(context[-1])
    while len(out) < k:
        nxt = next((t for t in (table.next_token(last) for table in tables) if t >= 0), -1)
        if nxt < 0:
            break
        out.append(nxt)
        last = nxt
    return out


class MaGDrafter(Drafter):
    """MaG on its own (a cascade of one level); the cascade uses `MaGSession.draft_after`."""

    deterministic = True

    def __init__(self, table: BigramTable | None = None, max_ngram: int = 8, min_ngram: int = 1,
                 name: str = "mag"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.table, self.max_ngram, self.min_ngram, self.name = table, max_ngram, min_ngram, name

    def start(self, prompt_ids, params, generator):
        return MaGSession(prompt_ids, self.table, self.max_ngram, self.min_ngram)


class MaGSession(DraftSession):
    def __init__(self, prompt_ids, table: BigramTable | None, max_ngram: int, min_ngram: int):
        super().__init__(prompt_ids)
        self.table, self.max_ngram, self.min_ngram = table, max_ngram, min_ngram
        self._context_table: BigramTable | None = None    # built lazily from the committed context

    def update(self, new_tokens, num_accepted):
        super().update(new_tokens, num_accepted)
        self._context_table = None

    def _tables(self) -> list[BigramTable]:
        if self._context_table is None:
            self._context_table = build_bigram_table([torch.tensor(self.context, dtype=torch.long)])
        # The target-generated table first; the request's own bigrams cover what it never saw.
        return [self.table, self._context_table] if self.table is not None else [self._context_table]

    def draft_after(self, pending: list[int], k: int) -> list[int]:
        """Up to k tokens continuing context + pending (draft tokens of the levels above)."""
        ids = torch.tensor(self.context + pending, dtype=torch.long)
        return mag_draft(ids, k, self._tables(), self.max_ngram, self.min_ngram)

    def propose(self, k: int) -> Draft:
        tokens = self.draft_after([], k)
        return Draft(tokens=tokens) if tokens else EMPTY_DRAFT
