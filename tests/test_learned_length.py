"""AdaEAGLE's learned draft length: the predictor (core/length_predictor.py), the drafter's state
(workers/draft_states.py), the logs and training (orchestrator/learned_length.py), the config."""
from __future__ import annotations

import pytest
import torch

from core.draft_length import FixedDraftLength
from core.length_predictor import LengthPredictor, init_predictor, load_predictor, save_predictor, train_predictor
from orchestrator.engine import SpeculativeEngine
from orchestrator.learned_length import log_draft_states, train_from_logs
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from tests.test_engine import noisy_copy
from workers.draft_states import DraftStateDrafter, DraftStateLog, _DraftStateSession
from workers.drafters import DraftModelDrafter
from workers.runner import ModelRunner

K_MAX = 6


@pytest.fixture(scope="module")
def pair():
    """A qwen2 target and a noisy copy as drafter: acceptance varies from step to step."""
    target = tiny_model("qwen2", seed=0, layers=3)
    return target, noisy_copy(target, 0.5, 5)


def spread_predictor(num_features: int, seed: int = 0) -> LengthPredictor:
    """Random weights whose draft lengths vary with the features (a sharp output layer)."""
    p = init_predictor(num_features, K_MAX, 16, torch.Generator().manual_seed(seed))
    p.w1 *= 8.0
    p.w2 *= 8.0
    return p


_RUNNERS: dict[int, ModelRunner] = {}


def runner_of(model) -> ModelRunner:
    """One runner per model (a runner times its kernels when built)."""
    if id(model) not in _RUNNERS:
        _RUNNERS[id(model)] = ModelRunner(model)
    return _RUNNERS[id(model)]


def run(target_model, drafter, prompts, k=K_MAX, max_new=24):
    engine = SpeculativeEngine(runner_of(target_model), drafter, lambda: FixedDraftLength(k))
    return [engine.generate(p, max_new) for p in prompts]


def logged_runs(target_model, runner, predictor, prompts, max_new=24):
    """One log per prompt, with k_min 1 (every step drafts, so every step has a row)."""
    logs = []
    for p in prompts:
        logs.append(DraftStateLog())
        drafter = DraftStateDrafter(DraftModelDrafter(runner), predictor, k_min=1, state_log=logs[-1])
        assert_drafted(run(target_model, drafter, [p], max_new=max_new))
    return logs


def assert_lengths_follow_the_state(logs, predictor, max_new=24):
    """Each step drafted what the MLP says for that step's logged state (within the engine's cut at
    max_new_tokens), and the lengths vary: a policy blind to the state would not match."""
    chosen_all = []
    for log in logs:
        committed = 1
        for features, drafted, accepted in zip(log.features, log.drafted, log.accepted):
            predicted = max(1, predictor.draft_length(features.float()))
            chosen = min(K_MAX, max_new - committed - 1, predicted)
            assert drafted == chosen, f"drafted {drafted}, the MLP says {chosen}"
            chosen_all.append(predicted)
            committed += accepted + 1
    assert len(set(chosen_all)) >= 2, f"one length for every state: {chosen_all}"


def test_the_predictor_chooses_each_draft_length_from_the_drafters_state(pair, prompts, monkeypatch):
    target_model, drafter_model = pair
    runner = runner_of(drafter_model)
    predictor = spread_predictor(2 * runner.config.hidden_size)
    assert_lengths_follow_the_state(logged_runs(target_model, runner, predictor, prompts[:2]), predictor)

    # Broken: the MLP fed zeros instead of the state -> one length everywhere.
    with monkeypatch.context() as m:
        m.setattr(_DraftStateSession, "features", lambda self: torch.zeros(predictor.num_features))
        blind = logged_runs(target_model, runner, predictor, prompts[:2])
    with pytest.raises(AssertionError, match="one length for every state"):
        assert_lengths_follow_the_state(blind, predictor)
    # Broken: a predictor that ignores its input (always 3) -> not what the MLP says for the logged states.
    with monkeypatch.context() as m:
        m.setattr(LengthPredictor, "draft_length", lambda self, features, threshold=0.5: 3)
        constant = logged_runs(target_model, runner, predictor, prompts[:2])
    with pytest.raises(AssertionError, match="the MLP says"):
        assert_lengths_follow_the_state(constant, predictor)


def test_logged_features_are_the_drafters_hidden_state_and_embedding_of_the_newest_token(pair, prompts, monkeypatch):
    """Checked against the HF model run from scratch on the committed context; labels against the
    engine's own accepted counts. A session reading the state one token late is caught."""
    target_model, drafter_model = pair

    def logged(prompt):
        log = DraftStateLog()
        result = run(target_model, DraftStateDrafter(DraftModelDrafter(runner_of(drafter_model)), state_log=log),
                     [prompt])[0]
        assert_drafted(result, accepted=True)
        assert log.drafted == result.stats.draft_lengths and log.accepted == result.stats.accepted_lengths
        return log, result

    def assert_newest_token_state(prompt, log, result):
        committed = 1
        for step, features in enumerate(log.features[:4]):
            context = list(prompt) + result.tokens[:committed]
            with torch.inference_mode():
                out = drafter_model(torch.tensor([context]), output_hidden_states=True)
            expected = torch.cat([out.hidden_states[-1][0, -1], drafter_model.model.embed_tokens.weight[context[-1]]])
            assert torch.allclose(features.float(), expected.float(), atol=2e-2), f"step {step}: not the newest token's state"
            committed += log.accepted[step] + 1

    log, result = logged(prompts[1])
    assert set(log.request) == {0} and len(log.features) >= 2
    assert_newest_token_state(prompts[1], log, result)
    # Broken: the embedding of the token before the newest.
    real = _DraftStateSession.features

    def one_late(self):
        newest = self.context.pop()
        try:
            return real(self)
        finally:
            self.context.append(newest)
    monkeypatch.setattr(_DraftStateSession, "features", one_late)
    log, result = logged(prompts[1])
    with pytest.raises(AssertionError, match="not the newest token's state"):
        assert_newest_token_state(prompts[1], log, result)


def test_greedy_equals_plain_with_the_learned_length(target_model, draft_model, prompts):
    runner = runner_of(draft_model)
    drafter = DraftStateDrafter(DraftModelDrafter(runner), spread_predictor(2 * runner.config.hidden_size), k_min=0)
    plain = SpeculativeEngine(runner_of(target_model))
    results = run(target_model, drafter, prompts)
    for p, r in zip(prompts, results):
        assert r.tokens == plain.generate(p, 24).tokens
    assert_drafted(results)


def synthetic(n: int, seed: int):
    """Features [n, 12] and labels in 0..K_MAX that follow one feature (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, 3] * 2 + 3 + 0.3 * torch.randn(n, generator=g)).round().clamp(0, K_MAX).long()
    return x, y


def test_training_beats_a_constant_predictor_on_a_learnable_rule(monkeypatch):
    x, y = synthetic(600, 0)
    val = torch.arange(600) % 4 == 3
    _, report = train_predictor(x, y, val, K_MAX, hidden=32, epochs=150)
    assert report.val_loss < 0.7 * report.baseline_loss
    assert report.val_mae < 0.6 * report.baseline_mae and report.val_accuracy > report.baseline_accuracy + 0.2
    # Broken: no optimiser step (the weights stay at their init) -> no better than the constant.
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    _, untrained = train_predictor(x, y, val, K_MAX, hidden=32, epochs=150)
    assert not untrained.val_loss < 0.7 * untrained.baseline_loss


def test_train_from_logs_drops_censored_steps_and_saves_weights_that_load(tmp_path):
    x, y = synthetic(400, 1)
    drafted = torch.full((400,), K_MAX)
    drafted[:50] = 2                          # short drafts (the end of a request) ...
    y[:50] = 2                                # ... accepted whole: "2 or more", dropped
    log = DraftStateLog([f.half() for f in x], drafted.tolist(), y.tolist(), (torch.arange(400) // 10).tolist())
    log.save(tmp_path / "log.pt")
    report = train_from_logs([str(tmp_path / "log.pt")], str(tmp_path / "w.pt"), hidden=32, epochs=100)
    assert report.train_rows + report.val_rows == 350
    assert report.val_loss < report.baseline_loss
    loaded = load_predictor(tmp_path / "w.pt")
    assert loaded.k_max == K_MAX and loaded.num_features == 12
    assert (tmp_path / "w.pt").stat().st_size < 1_000_000
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"w1": torch.zeros(3, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not draft-length predictor weights"):
        load_predictor(tmp_path / "bad.pt")


def test_bench_logging_wraps_plain_draft_model_engines_only(pair):
    target_model, drafter_model = pair
    target = ModelRunner(target_model)
    engines = {"plain": SpeculativeEngine(target),
               "sd": SpeculativeEngine(target, DraftModelDrafter(runner_of(drafter_model)))}
    logs = log_draft_states(engines)
    assert list(logs) == ["sd"] and isinstance(engines["sd"].drafter, DraftStateDrafter)


# ------------------------------------------------------------------ config
def _strategy(draft_length: dict, **extra):
    from orchestrator.strategies import KINDS

    raw = {"name": "s", "kind": "draft_model", "drafter": "d", "draft_length": draft_length, **extra}
    return KINDS[raw["kind"]].model_validate(raw)


def test_config_errors_name_the_key_and_the_file(tmp_path, pair):
    from pydantic import ValidationError

    from core.config import ConfigError

    missing = str(tmp_path / "none.pt")
    with pytest.raises(ValidationError, match=r"weights[\s\S]*none.pt"):
        _strategy({"policy": "learned", "weights": missing})
    weights = tmp_path / "w.pt"
    save_predictor(init_predictor(10, K_MAX, 8, torch.Generator().manual_seed(0)), weights)
    with pytest.raises(ValidationError, match="k_min"):
        _strategy({"policy": "learned", "weights": str(weights), "k_min": 5, "k_max": 3})
    with pytest.raises(ValidationError, match="draft_model.*one token at a time"):
        _strategy({"policy": "learned", "weights": str(weights)}, lookup_first={})
    with pytest.raises(ValidationError, match="kind prompt_lookup cannot use it.*one token at a time"):
        from orchestrator.strategies import KINDS

        KINDS["prompt_lookup"].model_validate({"name": "p", "kind": "prompt_lookup",
                                              "draft_length": {"policy": "learned", "weights": str(weights)}})
    s = _strategy({"policy": "learned", "weights": str(weights), "k_max": K_MAX})
    runner = ModelRunner(pair[1])          # hidden 64: 128 features, the file has 10
    with pytest.raises(ConfigError, match=r"draft_length\.weights.*w\.pt.*10 features.*128"):
        s.make_drafter(runner)
    big = _strategy({"policy": "learned", "weights": str(weights), "k_max": K_MAX + 1})
    save_predictor(init_predictor(128, K_MAX, 8, torch.Generator().manual_seed(0)), weights)
    with pytest.raises(ConfigError, match=r"k_max"):
        big.make_drafter(runner)
    assert isinstance(s.make_drafter(runner), DraftStateDrafter)
    assert not s.drafts_by_forward()
