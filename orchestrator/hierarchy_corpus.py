"""`launch.py build-corpus`: Hierarchy Drafting's static corpus (workers/hierarchy.py: CorpusTable)
from a prompt set.

Each jsonl row's texts are tokenised with the tokenizer of the model the strategy serves (the target's:
drafts are in its token ids): the prompt (`prompt`, `text`, or every entry of `turns`) and, when the row
has them, reference outputs (`output`, `completion`, `canonical_solution`, `reference`, or a list
`outputs`). HumanEval and Spec-Bench files fit as they are; do not build from the prompts you bench.
"""
from __future__ import annotations

import json
from pathlib import Path

from workers.hierarchy import CorpusTable, build_corpus

PROMPT_FIELDS = ("prompt", "text")
OUTPUT_FIELDS = ("output", "completion", "canonical_solution", "reference")


def row_texts(row: dict) -> list[str]:
    """The texts of one jsonl row (prompts, then reference outputs)."""
    texts = [row[f] for f in PROMPT_FIELDS if isinstance(row.get(f), str)]
    texts += [t for t in row.get("turns", []) if isinstance(t, str)]
    texts += [row[f] for f in OUTPUT_FIELDS if isinstance(row.get(f), str)]
    texts += [t for t in row.get("outputs", []) if isinstance(t, str)]
    return [t for t in texts if t]


def corpus_texts(paths: list[str | Path], limit: int | None = None) -> list[str]:
    """Every text of the jsonl files, `limit` rows per file (None = all)."""
    texts = []
    for path in paths:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        for i, row in enumerate(rows[:limit]):
            found = row_texts(row)
            if not found:
                raise ValueError(f"{path}: row {i + 1} has none of the text fields "
                                 f"{PROMPT_FIELDS + ('turns',) + OUTPUT_FIELDS + ('outputs',)}: {sorted(row)}")
            texts += found
    return texts


def corpus_from_texts(texts: list[str], tokenizer, ngram_sizes=(3, 2, 1), continuation_tokens: int = 8,
                      per_key: int = 4, min_count: int = 1, meta: dict | None = None) -> CorpusTable:
    sequences = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    meta = dict(meta or {}, texts=len(texts), tokens=sum(map(len, sequences)))
    return build_corpus(sequences, ngram_sizes, continuation_tokens, per_key, min_count, meta)
