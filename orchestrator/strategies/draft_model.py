"""`kind: draft_model`: a smaller model of the target's vocabulary drafts a chain (optionally stopping
at a low-confidence token, scoring a trimmed vocabulary, or copying from the prompt first: a hybrid).
The drafter is workers/drafters.py's DraftModelDrafter (LookupThenModelDrafter for the hybrid)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from core.config import DraftLength, FixedLength, NgramRange, Strict
from core.paths import LocalPath
from orchestrator.strategies.base import StrategyConfig


class DraftVocab(Strict):
    """VocabTrim (workers/vocab_trim.py): the token ids a drafter's output head scores, besides the
    prompt's tokens. A strategy's `draft_vocab` takes this or an int (the `size` lowest ids)."""
    size: int = Field(ge=1, description="Token ids the drafter scores (plus the prompt's tokens)")
    mode: Literal["lowest", "frequency"] = Field(description=(
        "lowest: the `size` lowest token ids; frequency: the `size` most frequent ids of `table` "
        "(VocabTrim as published; the lowest ids not in the table fill up when it ranks fewer)"))
    table: LocalPath | None = Field(None, description=(
        "mode frequency: the token frequency table of `launch.py build-vocab-table` (docs/vocab_trim.md); "
        "a relative path is read from the working directory of the process that loads the config, also "
        "through Ray (core/paths.py)"))

    @model_validator(mode="after")
    def _table_with_frequency(self):
        if (self.mode == "frequency") != (self.table is not None):
            raise ValueError(f"table: mode frequency needs a table and mode lowest takes none "
                             f"(mode {self.mode}, table {self.table!r})")
        return self

    def missing_table(self) -> str | None:
        """Why the table cannot be read (not built), or None."""
        if self.table is not None and not Path(self.table).is_file():
            return (f"its draft_vocab.table {self.table!r} does not exist (build it with "
                    "`python launch.py build-vocab-table`, docs/vocab_trim.md)")
        return None


# A strategy's draft_vocab: the int form (lowest ids) or VocabTrim's section; told apart by type, so an
# error names the form written (draft_vocab.mapping.<key> or draft_vocab.int), not both forms' complaints.
TrimmedVocab = Annotated[Union[Annotated[int, Field(ge=0), Tag("int")], Annotated[DraftVocab, Tag("mapping")]],
                         Discriminator(lambda v: "int" if isinstance(v, int) else "mapping")]
DRAFT_VOCAB_HELP = (
    "VocabTrim: an int > 0 scores only that many lowest token ids plus the prompt's tokens, or "
    "{size, mode: lowest | frequency, table} (frequency: the most frequent ids of a `launch.py "
    "build-vocab-table` table, as published); a cheaper output head, output unchanged, acceptance may "
    "drop. 0 = full vocabulary")


def vocab_trim_args(draft_vocab: int | DraftVocab, strategy: str) -> dict:
    """The drafter's `draft_vocab` and `vocab_ranking` arguments (workers/drafters.py) for a strategy's
    `draft_vocab` field; reads the frequency table."""
    if isinstance(draft_vocab, int):
        return {"draft_vocab": draft_vocab}
    if draft_vocab.mode == "lowest":
        return {"draft_vocab": draft_vocab.size}
    problem = draft_vocab.missing_table()
    if problem:
        raise ValueError(f"strategy {strategy!r}: {problem}")
    from workers.vocab_trim import load_frequency_table

    return {"draft_vocab": draft_vocab.size, "vocab_ranking": load_frequency_table(draft_vocab.table).ids}


class LookupFirst(NgramRange):
    """Copy from the context when its suffix n-gram occurred before; draft with the model otherwise."""
    max_ngram: int = Field(3, ge=1, le=16, description="Longest context n-gram to match")
    min_ngram: int = Field(2, ge=1, le=16, description="Shorter matches fall through to the model")
    k: int = Field(10, ge=1, le=64, description="Tokens copied per lookup draft")


class DraftModelStrategy(StrategyConfig):
    kind: Literal["draft_model"]
    drafter: str = Field(description="Key of models.drafters")
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Stop a draft after a token the drafter gave less than this probability (0 = off)"))
    draft_vocab: TrimmedVocab = Field(0, description=DRAFT_VOCAB_HELP)
    lookup_first: LookupFirst | None = Field(None, description="Prompt lookup before the model (a hybrid)")
    draft_length: DraftLength = Field(default_factory=FixedLength, description=(
        "Tokens drafted per step: fixed, adaptive, goodput, heuristic, thompson, adl or learned "
        "(draft_length.policy)"))

    def model_refs(self):
        return [("drafter", self.drafter)]

    def drafts_by_forward(self):
        # The learned draft length reads hidden states from the forward (hidden_out), which a drafter
        # actor's batching queue does not return.
        return self.draft_length.policy != "learned"

    def reads_draft_states(self):
        return self.lookup_first is None

    def unavailable(self):
        return None if isinstance(self.draft_vocab, int) else self.draft_vocab.missing_table()

    def make_drafter(self, runner, runners=None):
        from workers.drafters import DraftModelDrafter, LookupThenModelDrafter, PromptLookupDrafter

        drafter = DraftModelDrafter(runner, name=self.drafter, min_confidence=self.min_confidence,
                                    **vocab_trim_args(self.draft_vocab, self.name))
        if self.lookup_first is not None:
            lf = self.lookup_first
            drafter = LookupThenModelDrafter(PromptLookupDrafter(lf.max_ngram, lf.min_ngram), drafter, lf.k)
        if self.draft_length.policy == "learned":
            drafter = self._learned_length(drafter)
        return drafter

    def _learned_length(self, drafter):
        """The drafter choosing each draft's length with the predictor of draft_length.weights."""
        from core.config import ConfigError
        from core.length_predictor import load_predictor
        from workers.draft_states import DraftStateDrafter

        dl = self.draft_length
        where = f"strategy {self.name!r}: draft_length.weights {dl.weights}"
        try:
            predictor = load_predictor(dl.weights)
            if dl.k_max > predictor.k_max:
                raise ValueError(f"k_max {dl.k_max} exceeds the {predictor.k_max} the weights were trained for")
            return DraftStateDrafter(drafter, predictor, k_min=dl.k_min, threshold=dl.threshold)
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def ray_drafter(self, ctx):
        """The model drafts in its actor; a hybrid's context lookup runs beside the engine, so a step that
        copies (or, under the goodput scheduler, drafts nothing) makes no round trip to the actor. The
        actor's session runs the same lookup first and finds nothing where this one found nothing."""
        remote = super().ray_drafter(ctx)
        if self.lookup_first is None:
            return remote
        from workers.drafters import LookupThenModelDrafter, PromptLookupDrafter

        lf = self.lookup_first
        return LookupThenModelDrafter(PromptLookupDrafter(lf.max_ngram, lf.min_ngram), remote, lf.k)

    def capacity_family(self):
        return "hybrid" if self.lookup_first is not None else "draft_model"

    def model_every_step(self):
        return self.lookup_first is None and not self.min_confidence
