"""Token Recycling (Luo et al., "Turning Trash into Treasure", arXiv 2408.08696): draft trees from the
target's own past top-k predictions.

Every verification forward scores a next-token distribution at each input position (the pending token
and every draft node, rejected ones too). Plain decoding keeps one token of each and throws the rest
away; Token Recycling keeps the top `width` (8) of every row in an adjacency matrix: row `t` holds the
tokens the target last ranked highest after token `t`. To draft, a static breadth-first tree template is
filled from the matrix starting at the last committed token: a node at rank `r` under a node of token
`t` takes `matrix[t, r]`. The target verifies the tree (core/verification.py's tree rule; the drafts
are deterministic, so q is one-hot) and its logits rows refill the matrix.

Pieces:
- `TreeTemplate`: the static tree (BFS order, parents before children); `TreeTemplate.paper()` is the
  authors' 80-node, depth-6 shape, `TreeTemplate.branching([...])` a uniform one.
- `RecyclingMatrix`: the `[V, width]` int32 table, its update from target top-k ids and the tree fill.
- `TokenRecyclingDrafter`: the `Drafter`; every session of one drafter shares its matrix, so what one
  request taught it helps the next (the engine that owns the drafter serves one target model, so the
  matrix is per target model).

State and memory: one matrix per drafter, `V x width` int32 (Qwen2.5's V = 151,936, width 8: 4.6 MiB),
allocated lazily in chunks of `ROW_CHUNK` rows up to the largest token id seen (at most
`(V + ROW_CHUNK - 1) x width x 4` bytes). It is never reset; a row is overwritten whenever its token is
verified again, so the table follows the recent traffic.

Rows never observed hold -1 and contribute no children, so a cold matrix drafts nothing (a plain step,
whose single logits row then fills the last token's row) instead of the authors' zero-initialised rows,
which propose token 0 eight times as siblings: duplicates the tree rule cannot take and wasted
verification rows.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from core.sampling import SamplingParams
from workers.drafters import EMPTY_DRAFT, Draft, Drafter, DraftSession

UNSEEN = -1          # a matrix entry no verification has filled
ROW_CHUNK = 8192     # the matrix grows by whole chunks of rows (its vocabulary is learned from the ids seen)
MAX_TREE_NODES = 512

# The authors' template (TokenRecycling, tree version "2.2.2"): how many children each node has, keyed by
# the node's rank path from the root (() = the root, the last committed token; (0, 1) = the second-ranked
# successor of the first-ranked one). Children take their parent's top-ranked successors, ranks 0..n-1.
# 8 + 21 + 25 + 15 + 8 + 3 = 80 nodes at depths 1..6.
PAPER_CHILDREN: dict[tuple[int, ...], int] = {
    (): 8,
    (0,): 8, (1,): 4, (2,): 3, (3,): 2, (4,): 1, (5,): 1, (6,): 1, (7,): 1,
    (0, 0): 8, (0, 1): 3, (0, 2): 2, (0, 3): 1, (0, 4): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1,
    (1, 0): 2, (1, 1): 1, (2, 0): 1, (3, 0): 1, (4, 0): 1, (5, 0): 1,
    (0, 0, 0): 5, (0, 0, 1): 2, (0, 0, 2): 1, (0, 0, 3): 1, (0, 0, 4): 1, (0, 1, 0): 1, (0, 2, 0): 1,
    (1, 0, 0): 1, (2, 0, 0): 1, (3, 0, 0): 1,
    (0, 0, 0, 0): 3, (0, 0, 0, 1): 1, (0, 0, 0, 2): 1, (0, 0, 1, 0): 1, (0, 1, 0, 0): 1, (1, 0, 0, 0): 1,
    (0, 0, 0, 0, 0): 2, (0, 0, 0, 1, 0): 1,
}


@dataclass(frozen=True)
class TreeTemplate:
    """A static draft tree, nodes in breadth-first order (parents before children, depth by depth)."""
    parents: tuple[int, ...]   # [n] parent node of each node, -1 = the root (the last committed token)
    ranks: tuple[int, ...]     # [n] which of its parent token's matrix entries the node takes (0 = top-1)
    level_ends: tuple[int, ...]  # [depth] nodes at depth <= d + 1 are the first level_ends[d]

    @property
    def depth(self) -> int:
        return len(self.level_ends)

    def __len__(self) -> int:
        return len(self.parents)

    @staticmethod
    def from_children(children: dict[tuple[int, ...], int]) -> "TreeTemplate":
        """Build from {rank path: number of children} (see PAPER_CHILDREN)."""
        parents: list[int] = []
        ranks: list[int] = []
        level_ends: list[int] = []
        level: list[tuple[tuple[int, ...], int]] = [((), -1)]     # (rank path, node index) of one depth
        while level:
            nxt = []
            for path, index in level:
                for rank in range(children.get(path, 0)):
                    nxt.append((path + (rank,), len(parents)))
                    parents.append(index)
                    ranks.append(rank)
            if nxt:
                level_ends.append(len(parents))
            level = nxt
        if not 0 < len(parents) <= MAX_TREE_NODES:
            raise ValueError(f"a tree template needs 1..{MAX_TREE_NODES} nodes, got {len(parents)}")
        return TreeTemplate(tuple(parents), tuple(ranks), tuple(level_ends))

    @staticmethod
    def paper() -> "TreeTemplate":
        return TreeTemplate.from_children(PAPER_CHILDREN)

    @staticmethod
    def branching(factors: list[int]) -> "TreeTemplate":
        """Every node at depth d (the root = 0) gets factors[d] children: [1] * 6 is a chain of top-1s."""
        if not factors or min(factors) < 1:
            raise ValueError(f"branching factors must be >= 1, got {factors}")
        children: dict[tuple[int, ...], int] = {}
        paths: list[tuple[int, ...]] = [()]
        for f in factors:
            for p in paths:
                children[p] = f
            paths = [p + (r,) for p in paths for r in range(f)]
            if len(paths) > MAX_TREE_NODES:
                raise ValueError(f"branching {factors}: more than {MAX_TREE_NODES} nodes")
        return TreeTemplate.from_children(children)


class RecyclingMatrix:
    """The adjacency matrix: row t = the target's top-`width` next tokens after token t, best first.

    Thread safety: every session of a drafter (several request threads) reads and writes one matrix.
    A row write is several elements and torch releases the GIL inside it, so without a lock a tree fill
    could read a half-written row (old and new entries mixed: duplicate siblings) or a matrix being
    replaced by a larger one. One lock guards both the writes and the fill's gathers; each holds it for
    a handful of small tensor operations (microseconds), far below a verification forward.
    """

    def __init__(self, width: int = 8):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = width
        self.rows = torch.full((0, width), UNSEEN, dtype=torch.int32)   # [rows, width], rows >= max id + 1
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def _grow(self, min_rows: int) -> None:
        """Called with the lock held."""
        have = self.rows.shape[0]
        if min_rows <= have:
            return
        size = -(-min_rows // ROW_CHUNK) * ROW_CHUNK
        grown = torch.full((size, self.width), UNSEEN, dtype=torch.int32)
        grown[:have] = self.rows
        self.rows = grown

    def observe(self, input_tokens: list[int], topk_ids: torch.Tensor) -> None:
        """Record the target's top-k after each input token.

        input_tokens: [n] tokens the target was fed (the pending token, then the draft nodes)
        topk_ids:     [n, k] the target's top-k next tokens at each of them, best first (on the host)
        A token fed twice (two tree nodes) keeps its shallowest row: its context is the least speculative.
        """
        first: dict[int, int] = {}
        for i, tok in enumerate(input_tokens):
            first.setdefault(tok, i)
        k = min(topk_ids.shape[1], self.width)
        rows = torch.tensor(list(first), dtype=torch.long)                              # [m]
        new = topk_ids[torch.tensor(list(first.values()), dtype=torch.long), :k].to(torch.int32)  # [m, k]
        top = max(int(rows.max()), int(new.max()) if new.numel() else 0)
        with self.lock:
            self._grow(top + 1)
            self.rows[rows, :k] = new
            if k < self.width:                 # a vocabulary smaller than the width: the rest stays unseen
                self.rows[rows, k:] = UNSEEN

    def fill(self, root: int, template: TreeTemplate, max_depth: int) -> Draft:
        """The template's nodes down to max_depth, filled from the matrix starting at `root`, as a tree
        draft. Nodes whose parent row is unseen are dropped with their subtrees, and so are repeated
        siblings (verify_tree needs distinct ones); a tree that is a single path comes back as a chain."""
        depth = min(max_depth, template.depth)
        if depth <= 0:
            return EMPTY_DRAFT
        n = template.level_ends[depth - 1]
        parents = torch.tensor(template.parents[:n], dtype=torch.long)                  # [n]
        ranks = torch.tensor(template.ranks[:n], dtype=torch.long)                      # [n]
        tokens = torch.full((n,), UNSEEN, dtype=torch.long)                             # [n]
        start = 0
        with self.lock:
            rows = self.rows                                                            # [R, width]
            if not 0 <= root < rows.shape[0]:
                return EMPTY_DRAFT                                                      # nothing seen yet
            for end in template.level_ends[:depth]:
                if start == 0:
                    parent_tok = torch.full((end,), root, dtype=torch.long)             # [level]
                else:
                    parent_tok = tokens[parents[start:end]]                             # [level]
                picked = rows[parent_tok.clamp_min(0), ranks[start:end]].long()         # [level]
                tokens[start:end] = torch.where(parent_tok >= 0, picked, UNSEEN)
                start = end
        return _compact(tokens.tolist(), template.parents[:n])


def _compact(tokens: list[int], parents: tuple[int, ...]) -> Draft:
    """Drop unseen nodes, repeated siblings and their subtrees; renumber the rest (order kept)."""
    index = [-1] * len(tokens)                 # template node -> draft node, -1 = dropped
    out_tokens: list[int] = []
    out_parents: list[int] = []
    taken: set[tuple[int, int]] = set()        # (draft parent, token)
    for i, (tok, parent) in enumerate(zip(tokens, parents)):
        new_parent = -1 if parent < 0 else index[parent]
        if tok < 0 or (parent >= 0 and new_parent < 0) or (new_parent, tok) in taken:
            continue
        taken.add((new_parent, tok))
        index[i] = len(out_tokens)
        out_tokens.append(tok)
        out_parents.append(new_parent)
    if all(p == i - 1 for i, p in enumerate(out_parents)):
        return Draft(tokens=out_tokens)            # a single path (or nothing): a chain
    return Draft(tokens=out_tokens, parents=out_parents)


class TokenRecyclingDrafter(Drafter):
    """Drafts trees from the shared adjacency matrix; every session learns from the target's top-k."""

    deterministic = True

    def __init__(self, width: int = 8, template: TreeTemplate | None = None, name: str = "token-recycling"):
        self.matrix = RecyclingMatrix(width)
        self.template = template or TreeTemplate.paper()
        if max(self.template.ranks) >= width:
            raise ValueError(f"the tree template takes up to {max(self.template.ranks) + 1} successors per "
                             f"token, more than the matrix width {width}")
        self.name = name

    def start(self, prompt_ids: list[int], params: SamplingParams,
              generator: torch.Generator | None) -> DraftSession:
        return _TokenRecyclingSession(self, prompt_ids)


class _TokenRecyclingSession(DraftSession):
    """A request's view: only its last committed token; the matrix is the drafter's."""

    def __init__(self, drafter: TokenRecyclingDrafter, prompt_ids: list[int]):
        super().__init__([])                  # the matrix needs no history, only the newest token
        self.drafter = drafter
        self.target_topk = drafter.matrix.width
        self.last = prompt_ids[-1]

    def propose(self, k: int) -> Draft:
        # k (the draft-length policy's) bounds the depth: the most tokens one step can accept.
        if k <= 0:
            return EMPTY_DRAFT
        return self.drafter.matrix.fill(self.last, self.drafter.template, k)

    def observe_target(self, input_tokens: list[int], topk_ids: torch.Tensor) -> None:
        self.drafter.matrix.observe(input_tokens, topk_ids)

    def update(self, new_tokens: list[int], num_accepted: int) -> None:
        if new_tokens:
            self.last = new_tokens[-1]
