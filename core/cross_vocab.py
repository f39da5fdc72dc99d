"""Cross-vocabulary drafting (OmniDraft): the pure pieces that relate two tokenizations of one text.

A drafter with its own tokenizer drafts text; the target verifies its own tokens. Both tokenize the
committed text, and wherever a draft token and a target token end at the same character (a shared
boundary) the pieces between two shared boundaries are one *pair*: a draft-token n-gram and the
target-token n-gram that spell the same text. `NgramMap` keeps the pairs seen (an online n-gram cache,
bounded, shared by the requests of one drafter) and `NgramMap.convert` turns a drafted draft-token
sequence into target tokens by longest matches. Which pairs the map holds only changes how many drafts
the target accepts: the target verifies every target token, so output never depends on it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

Pair = tuple[tuple[int, ...], tuple[int, ...]]      # (draft n-gram, target n-gram) spelling one text


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_boundary_pairs(draft_ids: list[int], draft_ends: list[int | None], target_ids: list[int],
                          target_ends: list[int | None], max_n: int) -> tuple[list[Pair], list[int]]:
    """The pairs between consecutive shared boundaries of two tokenizations of one text, and the
    character each pair ends at.

    draft_ids / draft_ends: [n_draft] tokens and the character each ends at (None: it ends inside a
    character, e.g. the first byte of a multi-byte one, so no boundary); target_ids / target_ends: the
    same for the target's tokens. Both must start at one character. Pairs longer than `max_n` tokens on
    either side are left out (too rare to repeat)."""
    target_at = {end: i for i, end in enumerate(target_ends) if end is not None}
    pairs: list[Pair] = []
    ends: list[int] = []
    d0 = t0 = 0
    for i, end in enumerate(draft_ends):
        j = target_at.get(end) if end is not None else None
        if j is None or j < t0:
            continue
        draft, target = tuple(draft_ids[d0:i + 1]), tuple(target_ids[t0:j + 1])
        if len(draft) <= max_n and len(target) <= max_n:
            pairs.append((draft, target))
            ends.append(end)
        d0, t0 = i + 1, j + 1
    return pairs, ends


class NgramMap:
    """Draft n-gram -> target n-gram, least recently used first out beyond `max_entries`; thread-safe
    (the requests of one drafter, in threads of one process or one drafter actor, share it)."""

    def __init__(self, max_entries: int, max_n: int):
        if max_entries < 1 or max_n < 1:
            raise ValueError(f"need max_entries >= 1 and max_n >= 1, got {max_entries}, {max_n}")
        self.max_entries, self.max_n = max_entries, max_n
        self._pairs: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0          # drafts converted by the map / left to the tokenizers

    def __len__(self) -> int:
        return len(self._pairs)

    def learn(self, pairs: list[Pair]) -> None:
        with self._lock:
            for draft, target in pairs:
                self._pairs[draft] = target
                self._pairs.move_to_end(draft)
            while len(self._pairs) > self.max_entries:
                self._pairs.popitem(last=False)

    def convert(self, draft_ids: list[int]) -> list[int] | None:
        """Target tokens spelling `draft_ids` by longest known n-grams, or None when some part is unknown."""
        out: list[int] = []
        with self._lock:
            i = 0
            while i < len(draft_ids):
                for n in range(min(self.max_n, len(draft_ids) - i), 0, -1):
                    target = self._pairs.get(tuple(draft_ids[i:i + n]))
                    if target is not None:
                        self._pairs.move_to_end(tuple(draft_ids[i:i + n]))
                        out.extend(target)
                        i += n
                        break
                else:
                    self.misses += 1
                    return None
            self.hits += 1
        return out
