"""AdaEAGLE's learned draft length around the engines: logging the drafter's states during a bench run
and training the predictor from those logs (`launch.py bench --log-draft-states`, `launch.py
train-draft-length`; docs/draft_length.md). The predictor is core/length_predictor.py, the sessions that
read the states workers/draft_states.py."""
from __future__ import annotations

from pathlib import Path

import torch

from core.length_predictor import TrainReport, save_predictor, train_predictor
from workers.draft_states import DraftStateDrafter, DraftStateLog, load_draft_states
from workers.drafters import DraftModelDrafter


def log_draft_states(engines: dict) -> dict[str, DraftStateLog]:
    """Make every engine drafting with a plain draft model (no lookup, no tree) log its drafter's
    states; returns strategy name -> its log. Labels are only uncensored below the draft length, so
    log a fixed-length strategy drafting k_max tokens."""
    logs = {}
    for name, engine in engines.items():
        if type(engine.drafter) is DraftModelDrafter:
            logs[name] = DraftStateLog()
            engine.drafter = DraftStateDrafter(engine.drafter, state_log=logs[name])
    return logs


def training_rows(paths: list[str], k_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(features [n, f], labels [n] in 0..k_max, request key [n], k_max) from draft-state logs.

    k_max: the longest draft logged (default). A step that accepted its whole draft of fewer than k_max
    tokens (the end of a request, or min_confidence) says only "at least that many": it is dropped. A
    step that accepted all of k_max is labelled k_max ("k_max or more": the label is censored there)."""
    logs = [load_draft_states(p) for p in paths]
    if not any(len(d["drafted"]) for d in logs):
        raise ValueError(f"no draft steps logged in {', '.join(paths)}")
    k_max = k_max or int(max(int(d["drafted"].max()) for d in logs if len(d["drafted"])))
    feats, labels, requests = [], [], []
    for i, d in enumerate(logs):
        drafted, accepted = d["drafted"], d["accepted"]
        keep = (accepted < drafted) | (drafted >= k_max)
        feats.append(d["features"][keep].float())
        labels.append(accepted[keep].clamp(max=k_max))
        requests.append(d["request"][keep] + (i << 32))      # one key per (log file, request)
    return torch.cat(feats), torch.cat(labels), torch.cat(requests), k_max


def validation_mask(requests: torch.Tensor, every: int = 4) -> torch.Tensor:
    """[n] bool: every `every`-th request (in order of first appearance) is held out, all its steps."""
    order = {r: j for j, r in enumerate(dict.fromkeys(requests.tolist()))}
    return torch.tensor([order[r] % every == every - 1 for r in requests.tolist()])


def train_from_logs(paths: list[str], out: str, k_max: int | None = None, hidden: int = 64,
                    epochs: int = 300, seed: int = 0) -> TrainReport:
    features, labels, requests, k_max = training_rows(paths, k_max)
    predictor, report = train_predictor(features, labels, validation_mask(requests), k_max, hidden=hidden,
                                        epochs=epochs, seed=seed)
    predictor.meta.update(logs=[str(Path(p)) for p in paths], rows=len(labels),
                          val_mae=report.val_mae, baseline_mae=report.baseline_mae)
    save_predictor(predictor, out)
    return report


def describe(report: TrainReport) -> str:
    return (f"{report.train_rows} training steps, {report.val_rows} held-out steps (whole requests)\n"
            f"                    MLP     constant\n"
            f"cross-entropy    {report.val_loss:7.3f}  {report.baseline_loss:7.3f}  (constant: training label frequencies)\n"
            f"accuracy         {report.val_accuracy:7.3f}  {report.baseline_accuracy:7.3f}  (constant: most common label)\n"
            f"MAE (tokens)     {report.val_mae:7.3f}  {report.baseline_mae:7.3f}  (MLP: predicted median; constant: training median)")
