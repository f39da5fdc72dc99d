"""Hierarchy Drafting (ALGORITHMS.md section 4; Cho et al., "Lossless Acceleration of Large Language
Models with Hierarchical Drafting based on Temporal Locality").

Candidate continuations of the committed context are taken from three token databases, read in order
of temporal locality (the most recently relevant text first):

1. `context`: n-grams of the request's own context (prompt + generated), most recent match first
   (`find_ngram_continuations`, as prompt lookup);
2. `recent`: the server's own recent generations (`RecentGenerations`): n-gram -> continuations
   filled from every request's committed tokens, shared across requests, an LRU bounded in keys;
3. `corpus`: a static corpus table (`CorpusTable`): n-gram -> its most frequent continuations in a
   prompt set, built offline (`launch.py build-corpus`, orchestrator/hierarchy_corpus.py).

Up to `num_candidates` distinct continuations (the paper's 7) of up to k tokens each are collected,
level after level, merged into a trie (`merge_into_trie`) and verified as one tree. Drafts are
deterministic (one-hot q), so verification stays lossless at any temperature (ALGORITHMS.md section 0).

State: `RecentGenerations` lives in the `HierarchyDrafter` object, shared by every session it opens;
sessions of concurrent requests call it from several threads, so it takes a lock around each add and
lookup. Per step a session does a handful of dict lookups (one per level and n-gram size) and inserts
one entry per committed token and n-gram size; nothing scales with the vocabulary.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from workers.drafters import EMPTY_DRAFT, Draft, Drafter, DraftSession, find_ngram_continuations, merge_into_trie

Key = tuple[int, ...]             # an n-gram of token ids, oldest first
Continuation = tuple[int, ...]    # the tokens that followed it

LEVELS = ("context", "recent", "corpus")   # the paper's order: temporal locality, nearest first
CORPUS_FORMAT = "specorch-hierarchy-corpus/1"


def ngram_entries(tokens: list[int], start: int, end: int, ngram_sizes: tuple[int, ...],
                  continuation_tokens: int):
    """(key, continuation) for each position i in [start, end) and n in ngram_sizes: the n tokens
    before i and up to `continuation_tokens` tokens from i (positions without n tokens before are skipped)."""
    for i in range(max(start, 1), min(end, len(tokens))):
        cont = tuple(tokens[i:i + continuation_tokens])
        for n in ngram_sizes:
            if i >= n:
                yield tuple(tokens[i - n:i]), cont


def _check_sizes(ngram_sizes) -> tuple[int, ...]:
    sizes = tuple(sorted(set(int(n) for n in ngram_sizes), reverse=True))
    if not sizes or sizes[-1] < 1:
        raise ValueError(f"ngram_sizes must be positive, got {list(ngram_sizes)}")
    return sizes


def _lookup(table, context: list[int], ngram_sizes: tuple[int, ...], limit: int) -> list[Continuation]:
    """Continuations of the context's suffix n-grams, the longest key first, each key's in its stored order."""
    out: list[Continuation] = []
    for n in ngram_sizes:
        if n > len(context):
            continue
        for cont in table.get(tuple(context[-n:]), ()):
            if cont not in out:
                out.append(cont)
                if len(out) >= limit:
                    return out
    return out


# ------------------------------------------------------------------ level 2: recent generations
class RecentGenerations:
    """The server's recent generations: n-gram -> its latest distinct continuations, most recent first.

    Bounded: at most `capacity` keys (least recently used evicted first, a lookup hit counts as a
    use), each with at most `per_key` continuations of at most `continuation_tokens` tokens: at the
    defaults (32768 keys x 4 x 8 tokens) < 64 MB even when no token object is shared (~1.6 kB per
    key, tests/test_hierarchy.py), ~10 MB on generated text, where a position's continuation and its
    token ints are shared by its keys. Thread-safe: every add and lookup holds one lock.
    """

    def __init__(self, ngram_sizes=(3, 2, 1), capacity: int = 32768, per_key: int = 4,
                 continuation_tokens: int = 8):
        if capacity < 1 or per_key < 1 or continuation_tokens < 1:
            raise ValueError(f"capacity, per_key and continuation_tokens must be >= 1, "
                             f"got {capacity}, {per_key}, {continuation_tokens}")
        self.ngram_sizes = _check_sizes(ngram_sizes)
        self.capacity, self.per_key, self.continuation_tokens = capacity, per_key, continuation_tokens
        self._table: OrderedDict[Key, list[Continuation]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, tokens: list[int], start: int, end: int | None = None) -> None:
        """Record what followed each position in [start, end) of `tokens` (a request's committed tokens)."""
        end = len(tokens) if end is None else end
        entries = list(ngram_entries(tokens, start, end, self.ngram_sizes, self.continuation_tokens))
        with self._lock:
            for key, cont in entries:
                conts = self._table.get(key)
                if conts is None:
                    self._table[key] = [cont]
                    if len(self._table) > self.capacity:
                        self._table.popitem(last=False)
                    continue
                self._table.move_to_end(key)
                # Seen again (or a prefix of a stored one: the tail of a request): the stored one moves
                # to the front; stored prefixes of the newest are dropped.
                newest = next((c for c in conts if c[:len(cont)] == cont), cont)
                conts[:] = [newest] + [c for c in conts if c is not newest and newest[:len(c)] != c][: self.per_key - 1]

    def lookup(self, context: list[int], limit: int) -> list[Continuation]:
        with self._lock:
            out = _lookup(self._table, context, self.ngram_sizes, limit)
            for n in self.ngram_sizes:          # the keys used stay (LRU)
                key = tuple(context[-n:])
                if n <= len(context) and key in self._table:
                    self._table.move_to_end(key)
            return out

    def __len__(self) -> int:
        return len(self._table)


# ------------------------------------------------------------------ level 3: static corpus
class CorpusTable:
    """A static n-gram -> continuations table, each key's continuations most frequent first. Read-only
    after construction, so sessions of any thread share it without a lock."""

    def __init__(self, table: dict[Key, list[Continuation]], ngram_sizes, continuation_tokens: int,
                 meta: dict | None = None):
        self.table = table
        self.ngram_sizes = _check_sizes(ngram_sizes)
        self.continuation_tokens = continuation_tokens
        self.meta = meta or {}

    def lookup(self, context: list[int], limit: int) -> list[Continuation]:
        return _lookup(self.table, context, self.ngram_sizes, limit)

    def __len__(self) -> int:
        return len(self.table)


def build_corpus(sequences: list[list[int]], ngram_sizes=(3, 2, 1), continuation_tokens: int = 8,
                 per_key: int = 4, min_count: int = 1, meta: dict | None = None) -> CorpusTable:
    """Count every (n-gram, continuation) pair of the token sequences; keep each key's `per_key` most
    frequent continuations seen at least `min_count` times (ties: the first seen; one that extends a
    kept continuation replaces it). Offline, so a plain Python count is fine."""
    sizes = _check_sizes(ngram_sizes)
    counts: Counter[tuple[Key, Continuation]] = Counter()
    for seq in sequences:
        counts.update(ngram_entries(list(seq), 1, len(seq), sizes, continuation_tokens))
    table: dict[Key, list[Continuation]] = {}
    for (key, cont), _ in sorted(counts.items(), key=lambda kv: -kv[1]):   # stable: ties keep first-seen order
        if counts[(key, cont)] < min_count:
            break
        _add_candidate(table.setdefault(key, []), cont, per_key)
    return CorpusTable(table, sizes, continuation_tokens, meta)


def save_corpus(corpus: CorpusTable, path: str | Path) -> None:
    """int32 rows: keys [entries, max_n] right-aligned, continuations [entries, continuation_tokens],
    both padded with -1; an entry per (key, continuation), a key's rows most frequent first."""
    width = corpus.ngram_sizes[0]
    keys, conts = [], []
    for key, cs in corpus.table.items():
        for c in cs:
            keys.append([-1] * (width - len(key)) + list(key))
            conts.append(list(c) + [-1] * (corpus.continuation_tokens - len(c)))
    torch.save({"format": CORPUS_FORMAT, "ngram_sizes": list(corpus.ngram_sizes),
                "continuation_tokens": corpus.continuation_tokens,
                "keys": torch.tensor(keys, dtype=torch.int32).reshape(-1, width),                        # [entries, max_n]
                "continuations": torch.tensor(conts, dtype=torch.int32).reshape(-1, corpus.continuation_tokens),
                "meta": corpus.meta}, path)


def load_corpus(path: str | Path) -> CorpusTable:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CORPUS_FORMAT:
        raise ValueError(f"{path}: not a Hierarchy Drafting corpus (build it with `launch.py build-corpus`)")
    table: dict[Key, list[Continuation]] = {}
    for key, cont in zip(data["keys"].tolist(), data["continuations"].tolist()):
        table.setdefault(tuple(t for t in key if t >= 0), []).append(tuple(t for t in cont if t >= 0))
    return CorpusTable(table, data["ngram_sizes"], int(data["continuation_tokens"]), data.get("meta"))


# ------------------------------------------------------------------ the drafter
class HierarchyDrafter(Drafter):
    """Multi-candidate drafts from the context, the server's recent generations and a static corpus,
    in that order; one tree draft per step. The recent-generations table is this object's: every
    session it opens reads it and adds its committed tokens to it."""

    deterministic = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_candidates: int = 7,
                 recent: RecentGenerations | None = None, corpus: CorpusTable | None = None,
                 levels: tuple[str, ...] = LEVELS, name: str = "hierarchy"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if len(set(levels)) != len(levels) or not set(levels) <= set(LEVELS):
            raise ValueError(f"levels: distinct names of {LEVELS}, got {list(levels)}")
        self.max_ngram, self.min_ngram, self.num_candidates = max_ngram, min_ngram, num_candidates
        self.recent = recent if recent is not None else RecentGenerations(range(min_ngram, max_ngram + 1))
        self.corpus = corpus
        self.levels, self.name = tuple(levels), name
        self._lock = threading.Lock()
        self.candidates_by_level: Counter[str] = Counter()   # candidates proposed, summed over closed sessions

    def start(self, prompt_ids, params, generator):
        return HierarchySession(self, prompt_ids)

    def _closed(self, counts: Counter) -> None:
        with self._lock:
            self.candidates_by_level.update(counts)


class HierarchySession(DraftSession):
    def __init__(self, drafter: HierarchyDrafter, prompt_ids: list[int]):
        super().__init__(prompt_ids)
        self.drafter = drafter
        self.candidates_by_level: Counter[str] = Counter()
        # A growing tensor copy of the context, so the context level's matching is vectorised.
        self._buf = torch.tensor(list(prompt_ids) + [0] * 256, dtype=torch.long)   # [capacity]
        # Positions before this one have been added to the recent generations (the prompt never is:
        # that level holds what the server generated).
        self._recorded = len(prompt_ids)

    def update(self, new_tokens, num_accepted):
        start = len(self.context)
        super().update(new_tokens, num_accepted)
        need = len(self.context)
        if need > self._buf.numel():
            self._buf = torch.cat([self._buf, torch.zeros(max(need, self._buf.numel()), dtype=torch.long)])
        self._buf[start:need] = torch.tensor(new_tokens, dtype=torch.long)
        # Record each position once its continuation is whole; other requests see it from now on.
        recent = self.drafter.recent
        whole = need - recent.continuation_tokens + 1    # positions < whole have continuation_tokens after them
        if whole > self._recorded:
            recent.add(self.context, self._recorded, whole)
            self._recorded = whole

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        d = self.drafter
        want = d.num_candidates
        candidates: list[list[int]] = []
        for level in d.levels:
            if len(candidates) >= want:
                break
            if level == "context":
                found = find_ngram_continuations(self._buf[: len(self.context)], k, d.max_ngram, d.min_ngram, want)
            elif level == "recent":
                found = d.recent.lookup(self.context, want)
            else:
                found = d.corpus.lookup(self.context, want) if d.corpus is not None else []
            for cont in found:
                if _add_candidate(candidates, list(cont[:k]), want):
                    self.candidates_by_level[level] += 1
        if not candidates:
            return EMPTY_DRAFT
        return Draft(tokens=candidates[0]) if len(candidates) == 1 else merge_into_trie(candidates)

    def close(self):
        self.drafter.recent.add(self.context, self._recorded)    # the tail: shorter continuations
        self._recorded = len(self.context)
        self.drafter._closed(self.candidates_by_level)


def _add_candidate(candidates: list, cont, limit: int) -> bool:
    """Add `cont` unless it is empty, full or a prefix of a candidate; it replaces a candidate that is a
    prefix of it (same tree nodes, one slot). True when it added tokens to the tree."""
    if not cont:
        return False
    for i, c in enumerate(candidates):
        if c[:len(cont)] == cont:
            return False
        if cont[:len(c)] == c:
            candidates[i] = cont
            return True
    if len(candidates) >= limit:
        return False
    candidates.append(cont)
    return True
