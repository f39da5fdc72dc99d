"""Cross-vocabulary drafting (OmniDraft, docs/cross_vocab.md): a small model with a tokenizer of its own
drafts for a target with another vocabulary.

The session keeps the committed text three ways: the target's tokens (`context`), their text, and the
drafter's tokenization of that text, whose KV the drafter caches. After each step the new target tokens
become text, the text's tail is re-tokenized by the drafter (a merge across the old end stays right) and
the drafter's cache is cropped to what still matches. A draft is drafted in draft tokens, then spelled in
target tokens: by the drafter's n-gram map (pairs of draft and target n-grams seen spelling the same
committed text; core/cross_vocab.py) when it knows every piece, else through the text. The last target
token of a draft is dropped: more text could still merge into it.

Lossless: greedy drafts are verified by the greedy rule; sampled drafts go to the verifier as
deterministic (one-hot) drafts, because the distribution over target tokens of a sampled draft-token
sequence is not computable; the one-hot rule accepts x with probability p(x) and resamples from the rest
of p, which is exact whatever proposed x (core/verification.py).
"""
from __future__ import annotations

import torch

from core.cross_vocab import NgramMap, common_prefix, shared_boundary_pairs
from core.sampling import SamplingParams, sample, warp_probs
from workers.drafters import EMPTY_DRAFT, Draft, DraftSession, Drafter
from workers.runner import ModelRunner

WINDOW = 4          # tokens of context before a piece when decoding it (a leading space, a split character)
TAIL = 4            # drafter tokens before the old end of the text that are re-tokenized with the new text


class Speller:
    """One tokenizer's view of text: pieces decoded in context so they concatenate to the whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def continuation(self, before: list[int], ids: list[int]) -> str:
        """The text `ids` add after the tokens `before`."""
        return self.decode(before + ids)[len(self.decode(before)):]

    def spell(self, before: list[int], ids: list[int]) -> tuple[str, list[int | None]]:
        """The text of `ids` after `before`, up to the last token that ends on a whole character, and
        the character (within that text) each token ends at: None when it ends inside a character."""
        ends: list[int | None] = []
        pieces: list[str] = []
        length, spelled, window = 0, 0, before[-WINDOW:]
        for i in range(len(ids)):
            piece = self.continuation(window, ids[spelled:i + 1])
            if piece.endswith("\ufffd"):           # a character split over tokens: wait for its end
                ends.append(None)
                continue
            pieces.append(piece)
            length += len(piece)
            ends.append(length)
            window, spelled = (window + ids[spelled:i + 1])[-WINDOW:], i + 1
        return "".join(pieces), ends


def tokenizer_difference(ours, theirs) -> str | None:
    """Why two tokenizers may spell one text in different ids, or None: the same token ids, end of
    sequence and (fast tokenizers) the same normalizer, pre-tokenizer, model (merges) and decoder."""
    import json

    a, b = ours.get_vocab(), theirs.get_vocab()
    if len(a) != len(b):
        return f"{len(a)} tokens against {len(b)}"
    other_ids = sum(b.get(token) != i for token, i in a.items())
    if other_ids:
        return f"{other_ids} of {len(a)} tokens have other ids"
    if ours.eos_token_id != theirs.eos_token_id:
        return f"end-of-sequence id {ours.eos_token_id} against {theirs.eos_token_id}"
    backends = [getattr(t, "backend_tokenizer", None) for t in (ours, theirs)]
    if None not in backends:
        a, b = (json.loads(t.to_str()) for t in backends)
        for part in ("normalizer", "pre_tokenizer", "model", "decoder"):
            if a.get(part) != b.get(part):
                return f"the same ids, another {part}"
    return None


class CrossVocabDrafter(Drafter):
    """A draft model of another vocabulary. One per strategy, so per target: its n-gram map (bounded,
    thread-safe) is shared by the strategy's requests."""

    def __init__(self, runner: ModelRunner, draft_tokenizer, target_tokenizer, name: str = "cross-vocab",
                 max_pairs: int = 65536, max_n: int = 4):
        self.runner, self.name = runner, name
        self.draft, self.target = Speller(draft_tokenizer), Speller(target_tokenizer)
        self.pairs = NgramMap(max_pairs, max_n)

    def start(self, prompt_ids, params, generator):
        return CrossVocabSession(self, prompt_ids, params, generator)


class CrossVocabSession(DraftSession):
    def __init__(self, drafter: CrossVocabDrafter, prompt_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None):
        super().__init__(prompt_ids)
        self.drafter, self.params, self.generator = drafter, params, generator
        self.text = ""
        self.spelled = 0                              # target tokens of `context` whose text is in `text`
        self.target_ends: list[int | None] = []       # [spelled] character each ends at in `text`
        self.draft_ids: list[int] = []                # the drafter's tokenization of `text`
        self.draft_ends: list[int | None] = []        # [len(draft_ids)]
        self.cached_ids: list[int] = []               # the tokens whose KV the drafter's cache holds
        self.learned_to = 0                           # character up to which the map has this text's pairs
        self.cache = drafter.runner.new_cache(1, capacity=2 * len(prompt_ids) + 256)
        self._catch_up()
        if len(self.draft_ids) > 1:                   # prefill now: a step's draft time is drafting only
            self._logits(self.draft_ids[:-1])

    # ------------------------------------------------------------------ text and tokenizations
    def _catch_up(self) -> None:
        """Spell the target tokens committed since the last call and re-tokenize the text's tail."""
        new = self.context[self.spelled:]
        piece, ends = self.drafter.target.spell(self.context[max(0, self.spelled - WINDOW):self.spelled], new)
        done = max((i + 1 for i, end in enumerate(ends) if end is not None), default=0)
        if not done:
            return
        old_end = len(self.text)
        self.target_ends += [None if end is None else old_end + end for end in ends[:done]]
        self.spelled += done
        self.text += piece
        # Re-tokenize from a whole character a few drafter tokens before the old end.
        b = max(0, len(self.draft_ids) - TAIL)
        while b > 0 and self.draft_ends[b - 1] is None:
            b -= 1
        start = self.draft_ends[b - 1] if b else 0
        tail_ids = self.drafter.draft.encode(self.text[start:])
        _, tail_ends = self.drafter.draft.spell(self.draft_ids[max(0, b - WINDOW):b], tail_ids)
        self.draft_ids = self.draft_ids[:b] + tail_ids
        self.draft_ends = self.draft_ends[:b] + [None if end is None else start + end for end in tail_ends]
        self._learn()

    def _learn(self) -> None:
        """Add the pairs of the text since the last one learned, from a boundary both tokenizations
        share; the text's last pair waits (more text may still merge into it)."""
        de, te, since = self.draft_ends, self.target_ends, self.learned_to
        i, j = len(de) - 1, len(te) - 1
        while i >= 0 and j >= 0:                      # both lists increase: walk back to a shared end
            if de[i] is None or de[i] > since:
                i -= 1
            elif te[j] is None or te[j] > since:
                j -= 1
            elif de[i] == te[j]:
                break
            elif de[i] > te[j]:
                i -= 1
            else:
                j -= 1
        if i < 0 or j < 0:
            i = j = -1
        pairs, ends = shared_boundary_pairs(self.draft_ids[i + 1:], de[i + 1:], self.context[j + 1:self.spelled],
                                            te[j + 1:], self.drafter.pairs.max_n)
        if len(pairs) > 1:
            self.drafter.pairs.learn(pairs[:-1])
            self.learned_to = ends[-2]

    def _to_target(self, drafted: list[int]) -> list[int]:
        """Target tokens spelling the drafted tokens after the committed text."""
        mapped = self.drafter.pairs.convert(drafted)
        if mapped is not None:
            return mapped
        draft, target = self.drafter.draft, self.drafter.target
        text = draft.continuation(self.draft_ids[-WINDOW:], drafted).rstrip("\ufffd")
        window = self.context[max(0, self.spelled - WINDOW):self.spelled]
        ids = target.encode(target.decode(window) + text)
        # Committed tokens are final: when the text re-tokenizes across them, spell the new text alone.
        return ids[len(window):] if ids[:len(window)] == window else target.encode(text)

    # ------------------------------------------------------------------ the draft model
    def _logits(self, feed: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones; the logits after the last [draft vocab]."""
        runner = self.drafter.runner
        logits = runner.forward(self.cache, torch.tensor([feed], device=runner.device),
                                logits_rows=slice(-1, None))[0, -1]
        self.cached_ids += feed
        return logits

    def _choose(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(logits.argmax())
        return int(sample(warp_probs(logits, self.params), self.generator))

    def propose(self, k: int) -> Draft:
        if k <= 0 or not self.draft_ids or self.spelled < len(self.context):
            return EMPTY_DRAFT           # nothing to draft from, or a character still split over tokens
        keep = min(common_prefix(self.cached_ids, self.draft_ids), len(self.draft_ids) - 1)
        self.cache.crop(0, keep)
        self.cached_ids = self.cached_ids[:keep]
        logits = self._logits(self.draft_ids[keep:])
        drafted: list[int] = []
        target: list[int] = []
        most = 2 * k + 2                  # a target token rarely spells as more than two drafter tokens
        while True:
            token = self._choose(logits)
            if token == self.drafter.draft.eos:
                # The text ends here, so its last target token is final; the target's end follows it.
                eos = [] if self.drafter.target.eos is None else [self.drafter.target.eos]
                return Draft(tokens=((self._to_target(drafted) if drafted else []) + eos)[:k])
            drafted.append(token)
            target = self._to_target(drafted)
            if len(target) > k or len(drafted) == most:   # past k: the last one, which may still change, is cut
                break
            logits = self._logits([token])
        return Draft(tokens=target[:min(k, len(target) - 1)])

    def update(self, new_tokens, num_accepted):
        super().update(new_tokens, num_accepted)
        self._catch_up()

    def close(self):
        self.cache = None
