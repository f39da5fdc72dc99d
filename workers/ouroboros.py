"""Ouroboros (Zhao et al., "Ouroboros: Generating Longer Drafts Phrase by Phrase", github thunlp/Ouroboros):
the draft model's chain, extended by phrases the target itself produced earlier (docs/ouroboros.md).

Pieces:
- `PhrasePool`: key token -> the phrases (short token tuples) that followed it in verification results,
  most recent first. Bounded: at most `max_keys` keys (least recently used evicted) and
  `phrases_per_key` phrases of at most `phrase_len` tokens per key (oldest evicted). One lock guards it:
  every session of a drafter (concurrent request threads) reads and writes the one pool.
- `OuroborosDrafter`: the `Drafter`; its pool lives in the drafter object, one per strategy in the
  process or drafter actor that serves it, so the pool is per target model and kept across requests.
- `OuroborosSession`: a `_DraftModelSession` (workers/drafters.py: the KV-cached draft-model chain) whose
  propose extends the chain with pool phrases keyed by the chain's tokens (the last one first) and by the
  last committed token, merged into one tree (`merge_into_trie`, the chain first).

Where the phrases come from (the target, never the drafter):
- `observe_target` (`target_topk = 1`): after each verification, the target's argmax after every input
  token, rejected draft tokens included; from each input position, the argmax, then while a draft child
  carries that argmax, its argmax too (the target-corrected continuation inside the verified tree);
- `update`: the committed output's `phrase_len`-grams (each committed token -> the tokens that followed).

Losslessness: chain nodes keep the q they were sampled from; phrase nodes are one-hot rows. A chain node
is always the first (lowest-index) child among its siblings, so core/verification.py's sibling rule tries
the sampled child before the one-hot ones (which may depend on it); see docs/ouroboros.md.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from core.sampling import SamplingParams
from workers.drafters import EMPTY_DRAFT, Draft, Drafter, _DraftModelSession, merge_into_trie
from workers.opt_tree import OptTreeSession
from workers.runner import ModelRunner

Phrase = tuple[int, ...]


class PhrasePool:
    """key token -> phrases that followed it (at most `phrases_per_key`, each <= `phrase_len` tokens).

    A phrase that is a prefix of one already kept only refreshes that one; a new phrase replaces the kept
    phrases that are prefixes of it (a trie of the candidates would merge them anyway). Reads and writes
    refresh a key's recency; the least recently used key goes when there are more than `max_keys`.
    Worst case: max_keys x phrases_per_key x phrase_len tokens.
    """

    def __init__(self, max_keys: int = 32768, phrases_per_key: int = 8, phrase_len: int = 4):
        if min(max_keys, phrases_per_key, phrase_len) < 1:
            raise ValueError(f"pool limits must be >= 1, got max_keys={max_keys}, "
                             f"phrases_per_key={phrases_per_key}, phrase_len={phrase_len}")
        self.max_keys, self.phrases_per_key, self.phrase_len = max_keys, phrases_per_key, phrase_len
        self._keys: OrderedDict[int, OrderedDict[Phrase, None]] = OrderedDict()   # oldest first, both levels
        self.lock = threading.Lock()

    def __len__(self) -> int:
        """Phrases kept, over all keys."""
        with self.lock:
            return sum(len(b) for b in self._keys.values())

    @property
    def num_keys(self) -> int:
        return len(self._keys)

    def add(self, key: int, phrase: list[int] | Phrase) -> None:
        phrase = tuple(phrase[: self.phrase_len])
        if not phrase:
            return
        with self.lock:
            bucket = self._keys.get(key)
            if bucket is None:
                bucket = self._keys[key] = OrderedDict()
                if len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(key)
            covering = next((p for p in bucket if p[: len(phrase)] == phrase), None)
            if covering is not None:
                bucket.move_to_end(covering)
                return
            for shorter in [p for p in bucket if phrase[: len(p)] == p]:
                del bucket[shorter]
            bucket[phrase] = None
            if len(bucket) > self.phrases_per_key:
                bucket.popitem(last=False)

    def get(self, key: int, n: int) -> list[Phrase]:
        """Up to n phrases that followed `key`, most recent first."""
        with self.lock:
            bucket = self._keys.get(key)
            if not bucket:
                return []
            self._keys.move_to_end(key)
            return list(reversed(bucket))[:n]


class OuroborosDrafter(Drafter):
    """A draft model's chains extended by phrases of the target's past verifications (one shared pool)."""

    def __init__(self, runner: ModelRunner, name: str = "ouroboros", candidates: int = 4,
                 pool: PhrasePool | None = None, draft_vocab: int = 0):
        """candidates: phrases added to a chain per step (0 = the plain chain). pool: the phrase pool
        (default PhrasePool()). draft_vocab: as DraftModelDrafter's."""
        if candidates < 0:
            raise ValueError(f"candidates must be >= 0, got {candidates}")
        self.runner, self.name, self.candidates = runner, name, candidates
        self.pool = pool if pool is not None else PhrasePool()   # an empty pool is falsy (len 0)
        self.draft_vocab = draft_vocab

    def start(self, prompt_ids: list[int], params: SamplingParams, generator: torch.Generator | None):
        return OuroborosSession(self, prompt_ids, params, generator)


class OuroborosSession(_DraftModelSession):
    """One request: the drafter's KV cache and chain (the parent class), its last draft, the pool's."""

    target_topk = 1          # the target's argmax at every verified position fills the pool

    def __init__(self, drafter: OuroborosDrafter, prompt_ids, params, generator):
        super().__init__(drafter.runner, prompt_ids, params, generator, draft_vocab=drafter.draft_vocab)
        self.drafter, self.pool = drafter, drafter.pool
        self.chain: list[int] = []              # the model's chain of the last propose
        self.parents: list[int] = []            # [n] the last draft's parents (-1 = root), chain or tree
        self.next_phrase = len(prompt_ids) - 1  # first context position whose committed phrase is not pooled
        self.forwards = 0                       # drafter forwards of the proposes (one per chain token)

    # cost reporting, read by the engine (core/cost.py: draft_cost): `forwards` drafter forwards, as OPT-Tree
    # counts them (phrase nodes cost none; the default estimate would count every draft node as one)
    forward_params = OptTreeSession.forward_params
    forwards_by_level = OptTreeSession.forwards_by_level

    def propose(self, k: int) -> Draft:
        self.chain, self.parents = [], []
        if k <= 0:
            return EMPTY_DRAFT
        chain = super().propose(k)
        self.forwards += len(chain)
        self.chain = chain.tokens
        sequences = [chain.tokens] + self._extensions(chain.tokens)
        if len(sequences) == 1:
            self.parents = list(range(-1, len(chain) - 1))
            return chain
        tree = merge_into_trie(sequences)       # the chain first: nodes 0..m-1, each its siblings' first
        self.parents = tree.parents
        if chain.probs is not None:
            tree.probs = self._with_one_hot_phrases(chain.probs, tree.tokens)
        return tree                             # every extension adds a node, so it is more than the chain

    def _extensions(self, chain: list[int]) -> list[list[int]]:
        """Up to `candidates` sequences chain[:i + 1] + phrase, i from the chain's last token back to the
        root (i = -1: the last committed token), each adding a token the chain does not already have."""
        wanted = self.drafter.candidates
        out: list[list[int]] = []
        for i in range(len(chain) - 1, -2, -1):
            key = chain[i] if i >= 0 else self.context[-1]
            for phrase in self.pool.get(key, wanted):
                if len(out) == wanted:
                    return out
                if list(phrase) != chain[i + 1: i + 1 + len(phrase)]:
                    out.append(chain[: i + 1] + list(phrase))
        return out

    @staticmethod
    def _with_one_hot_phrases(chain_probs: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """q of every node: the sampled chain's rows (chain_probs [m, vocab]), then one-hot rows for the
        phrase nodes. Returns [n, vocab]."""
        m = chain_probs.shape[0]
        probs = chain_probs.new_zeros(len(tokens), chain_probs.shape[1])          # [n, vocab]
        probs[:m] = chain_probs
        rows = torch.arange(m, len(tokens), device=probs.device)
        probs[rows, torch.tensor(tokens[m:], device=probs.device)] = 1.0
        return probs

    def observe_target(self, input_tokens: list[int], topk_ids: torch.Tensor) -> None:
        """input_tokens [n + 1]: the pending token, then the last draft's nodes; topk_ids [n + 1, 1]."""
        argmax = topk_ids[:, 0].tolist()
        children: list[dict[int, int]] = [{} for _ in input_tokens]        # input index -> {token: index}
        for node, parent in enumerate(self.parents[: len(input_tokens) - 1]):
            children[parent + 1][input_tokens[node + 1]] = node + 1
        for i, key in enumerate(input_tokens):
            phrase, at = [], i
            while len(phrase) < self.pool.phrase_len:
                phrase.append(argmax[at])
                at = children[at].get(argmax[at], -1)
                if at < 0:
                    break
            self.pool.add(key, phrase)

    def update(self, new_tokens, num_accepted):
        committed_before = len(self.context)
        self.context.extend(new_tokens)
        # The cache holds the old context and the chain's tokens fed after it; the accepted path may leave
        # the chain for a phrase, so only its part equal to the chain stays valid.
        on_chain = 0
        for accepted, drafted in zip(new_tokens[:num_accepted], self.chain):
            if accepted != drafted:
                break
            on_chain += 1
        self.cache.crop(0, min(self.cache.lengths[0], committed_before + on_chain))
        self._pool_committed(complete=True)

    def _pool_committed(self, complete: bool) -> None:
        """Pool each committed output token's following tokens: full phrase_len phrases only (complete),
        or the shorter tail ones too (at close)."""
        length = self.pool.phrase_len
        last = len(self.context) - (length + 1 if complete else 2)
        for at in range(self.next_phrase, last + 1):
            self.pool.add(self.context[at], self.context[at + 1: at + 1 + length])
        self.next_phrase = max(self.next_phrase, last + 1)

    def close(self):
        if self.cache is not None:
            self._pool_committed(complete=False)
        super().close()
