"""DuoDecoding (orchestrator/duo.py): lossless output, the multi-sequence plan, the budget controller."""
from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from core.duo_policy import DraftBudgetController, largest_divisor_at_most, plan_num_sequences
from core.sampling import SamplingParams
from orchestrator.duo import DuoEngine, InProcessDrafterClient
from orchestrator.engine import SpeculativeEngine
from tests.drafting import GPU_READING, assert_drafted, fault_events
from tests.test_sampling_lossless import N_NEW, SAMPLES, V, exact_sequence_probs, small_vocab_model
from tests.test_verification import chi_square_p_value
from workers.duo_drafter import DuoDrafterSide
from workers.runner import ModelRunner


def duo(target: ModelRunner, drafter: ModelRunner, gamma=(4, 1, 8), multi=True, overlap=False, calibration=0):
    side = DuoDrafterSide(drafter)
    return DuoEngine(target, InProcessDrafterClient(side, overlap), DraftBudgetController(*gamma),
                     multi_sequence=multi, calibration_steps=calibration)


# ------------------------------------------------------------------ the multi-sequence plan
def test_plan_counts_alternatives_in_order_until_one_does_not_beat_lp12():
    lp12 = -2.0
    alternatives = torch.tensor([-1.0, -1.5, -3.0, -0.5])   # the 4th beats lp12 but comes after a miss
    assert plan_num_sequences(alternatives, lp12, budget=12) == 3
    assert plan_num_sequences(alternatives, lp12, budget=8) == 2     # 3 does not divide 8
    assert plan_num_sequences(alternatives, lp12, budget=7) == 1
    assert plan_num_sequences(torch.tensor([-3.0, -1.0]), lp12, budget=12) == 1
    assert plan_num_sequences(torch.full((7,), -0.1), lp12, budget=24) == 8
    assert plan_num_sequences(torch.full((7,), -0.1), lp12, budget=16) == 8
    assert plan_num_sequences(torch.full((7,), -0.1), lp12, budget=12) == 6
    assert [largest_divisor_at_most(24, k) for k in range(1, 9)] == [1, 2, 3, 4, 4, 6, 6, 8]


def test_drafter_builds_the_planned_sequences_from_a_hand_built_distribution():
    """A drafter whose next-token log-probs are fixed: x1 = 0 with log q = log .4, then q(.|x1) peaks at .5,
    so lp12 = log .2; tokens 1 (.3) and 2 (.25) beat it, 3 (.05) does not: k = 3 sequences of 12 / 3."""
    probs = torch.tensor([0.4, 0.3, 0.25, 0.05])

    class FixedModel:   # a draft-model backend (workers/duo_drafter.py) with hand-built distributions
        device = torch.device("cpu")
        vocab_size = 4

        def new_kv(self, prompt_len):
            class KV:
                fed: list[int] = []

                def truncate(self, n):
                    del self.fed[n:]

                def feed(self, tokens):
                    self.fed = self.fed + tokens
                    after_x1 = self.fed[-1] == 0 and len(self.fed) > 3
                    return (torch.tensor([0.5, 0.2, 0.2, 0.1]) if after_x1 else probs).log()
            return KV()

    side = DuoDrafterSide(FixedModel(), top_alternatives=8)
    side.open("r", [3, 3, 3], SamplingParams())
    draft = side.draft("r", [3, 3, 3], budget=12, multi_sequence=True)
    assert [s[0] for s in draft.sequences] == [0, 1, 2]
    assert [len(s) for s in draft.sequences] == [4, 4, 4]
    assert draft.probs is None      # greedy: deterministic drafts


# ------------------------------------------------------------------ the budget controller
def test_budget_matches_drafting_time_to_verify_time_and_shrinks_for_a_slower_drafter():
    c = DraftBudgetController(gamma_init=4, gamma_min=1, gamma_max=16, decay=0.5)
    assert c.budget() == 4                       # nothing measured yet
    c.observe(draft_token_s=0.01, verify_s=0.08)
    assert c.budget() == 8
    for _ in range(10):                          # the drafter becomes 4x slower
        c.observe(draft_token_s=0.04, verify_s=0.08)
    assert c.budget() == 2
    for _ in range(10):                          # a very fast drafter is clamped
        c.observe(draft_token_s=0.0001, verify_s=0.08)
    assert c.budget() == 16
    with pytest.raises(ValueError, match="gamma_min"):
        DraftBudgetController(gamma_init=0)


class SlowedRunner(ModelRunner):
    """A real drafter with a fixed delay per forward (the drafter made artificially slower)."""

    delay_s = 0.0

    def forward(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return super().forward(*args, **kwargs)


def test_engine_budget_reacts_to_an_artificially_slowed_drafter(target_model, draft_model, prompts):
    target = ModelRunner(target_model)
    drafter = SlowedRunner(draft_model)
    engine = duo(target, drafter, gamma=(4, 1, 16), calibration=2)
    engine.generate(prompts[1], 24)
    fast = engine.budget.budget()
    # 20x the target's verify forward as measured here (a busy machine slows it): budget 1 needs the
    # verify forward below 1.5 drafter tokens.
    drafter.delay_s = max(0.02, 20 * engine.budget.verify_s)
    engine.generate(prompts[1], 24)
    slow = engine.budget.budget()
    assert slow < fast or fast == 1
    assert slow == 1


class GatedRunner(ModelRunner):
    """A drafter whose forwards wait for `gate` (at most `hold_s`; then `waited_out` is set)."""

    hold_s = 10.0

    def __init__(self, model):
        super().__init__(model)
        self.gate = threading.Event()
        self.waited_out = False

    def forward(self, *args, **kwargs):
        if not self.gate.wait(self.hold_s):
            self.waited_out = True
        return super().forward(*args, **kwargs)


def test_first_token_never_waits_for_the_drafter(target_model, draft_model, prompts):
    """Round 0: the drafter's prefill and drafts run on its own thread; the first token comes from the
    target's prefill alone, however slow the drafter is (the time-to-first-token regression). Checked
    by cause, not by a time threshold: the drafter's forwards are held until the first token has been
    streamed, so a first token that waited for the drafter would come only after the hold ran out."""
    target = ModelRunner(target_model)
    expected = SpeculativeEngine(target, None).generate(prompts[0], 4).tokens
    for target_threads in (None, 1):       # drafter prefill beside the target's / deferred to round 1
        drafter = GatedRunner(draft_model)
        engine = DuoEngine(target, InProcessDrafterClient(DuoDrafterSide(drafter), overlap=True),
                           DraftBudgetController(2, 1, 2), calibration_steps=0, target_threads=target_threads)
        res = engine.generate(prompts[0], 4, on_tokens=lambda tokens: drafter.gate.set())
        assert not drafter.waited_out, f"target_threads={target_threads}: the first token waited for the drafter"
        assert res.tokens == expected
        assert_drafted(res)                 # and the drafter, once released, did draft


def test_budget_counts_one_token_drafter_forwards_only(target_model, draft_model, prompts):
    """A prompt prefill or a rollback re-feed is one long forward: timing it as one drafted token made
    the budget collapse to 1. Only one-token forwards (and their seconds) reach the controller."""
    side = DuoDrafterSide(ModelRunner(draft_model))
    side.open("r", prompts[0], SamplingParams())
    draft = side.draft("r", prompts[0], 4, False)           # prefill (one long forward) + 3 one-token forwards
    assert draft.forwards == 3 and len(draft.sequences[0]) == 4
    assert 0 < draft.step_s < draft.compute_s


def test_target_threads_are_set_while_decoding_and_restored(target_model, draft_model, prompts):
    seen = []

    class ThreadsSeen(ModelRunner):
        def forward(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            return super().forward(*args, **kwargs)

    before = torch.get_num_threads()
    engine = DuoEngine(ThreadsSeen(target_model), InProcessDrafterClient(DuoDrafterSide(ModelRunner(draft_model))),
                       DraftBudgetController(2, 1, 2), calibration_steps=0, target_threads=1)
    engine.generate(prompts[0], 6)
    assert seen[1:] and set(seen[1:]) == {1}      # every forward after the prefill ran on 1 thread
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------ lossless output
@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_output_equals_plain_decoding(target_model, draft_model, prompts, multi, overlap):
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target, None)
    for drafter_model in (draft_model, target_model):      # mostly rejected / mostly accepted drafts
        engine = duo(target, ModelRunner(drafter_model), gamma=(4, 2, 8), multi=multi, overlap=overlap)
        runs = []
        for prompt in prompts:
            expected = plain.generate(prompt, 30).tokens
            res = engine.generate(prompt, 30)
            assert res.tokens == expected
            assert len(res.stats.draft_budgets) == res.stats.steps
            runs.append(res)
        assert_drafted(runs, accepted=drafter_model is target_model, all_accepted=drafter_model is target_model)


def head_scaled_copy(model, factor: float):
    """The model with its output head (untied) multiplied by factor: -1 ranks tokens in reverse."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.lm_head.weight = torch.nn.Parameter(model.get_output_embeddings().weight * factor)
    return copy.float().eval()


def test_rounds_whose_pipelined_draft_is_discarded_still_decode_like_plain(target_model, prompts):
    """A drafter ranking tokens in reverse is rejected every round: every pipelined draft is thrown away;
    the target's copy as drafter gets them used. Both decode like plain."""
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target, None).generate(prompts[2], 40).tokens
    reversed_ = duo(target, ModelRunner(head_scaled_copy(target_model, -1.0)), gamma=(4, 4, 4)).generate(
        prompts[2], 40)
    matched = duo(target, ModelRunner(target_model), gamma=(4, 4, 4), multi=False).generate(prompts[2], 40)
    assert reversed_.tokens == plain == matched.tokens
    r = reversed_.stats
    assert r.speculative_drafts > 0 and r.speculative_used == 0 and r.accepted_tokens == 0
    assert r.drafter_busy_s > 0 and not fault_events(r), r.events     # rejected, not failed
    assert_drafted(matched, all_accepted=True)
    assert matched.stats.speculative_used > 0
    assert matched.stats.mean_accepted_tokens > 1.5


def test_drafting_overlaps_verification(target_model, draft_model, prompts):
    """The drafter drafts round i+1 while the target verifies round i: with the drafter on its own thread
    the request's wall time is clearly below the two sides' busy seconds added up; run sequentially
    (the baseline, same models and delays) it is not. Both sides sleep a known 50 ms per forward, far
    above a tiny model's compute, so the gap does not depend on how loaded the machine is."""
    target, drafter = SlowedRunner(target_model), SlowedRunner(draft_model)
    runs = {}
    for overlap in (False, True):
        # budget 1, one sequence: one drafter forward beside each target forward
        engine = duo(target, drafter, gamma=(1, 1, 1), multi=False, overlap=overlap)
        target.delay_s = drafter.delay_s = 0.0
        engine.generate(prompts[1], 4)                     # warm-up, undelayed
        target.delay_s = drafter.delay_s = 0.05
        res = engine.generate(prompts[1], 12)
        assert res.tokens == SpeculativeEngine(ModelRunner(target_model), None).generate(prompts[1], 12).tokens
        assert_drafted(res)
        s = res.stats
        runs[overlap] = (s.total_s, s.drafter_busy_s + s.target_busy_s)
    (seq_wall, seq_busy), (wall, busy) = runs[False], runs[True]
    assert seq_wall >= 0.95 * seq_busy, runs        # sequential: the busy intervals add up to the wall time
    assert wall < 0.75 * busy, f"no overlap: wall {wall:.3f} s vs drafter + target busy {busy:.3f} s"
    assert wall < 0.8 * seq_wall, runs


def test_multi_sequence_drafts_are_trees_and_stay_exact(target_model, prompts):
    """A drafter with the target's ranking but flatter log-probs plans several sequences."""
    target = ModelRunner(target_model)
    engine = duo(target, ModelRunner(head_scaled_copy(target_model, 0.05)), gamma=(8, 8, 8))
    side = engine.drafter.side
    side.open("probe", prompts[0], SamplingParams())
    assert len(side.draft("probe", prompts[0], 8, True).sequences) > 1
    plain = SpeculativeEngine(target, None)
    for prompt in prompts:
        res = engine.generate(prompt, 24)
        assert res.tokens == plain.generate(prompt, 24).tokens
        assert res.stats.speculative_used > 0
        assert_drafted(res, accepted=True)


# ------------------------------------------------------------------ sampling distribution
CASES = {
    "multi-seq-gamma4-t1": (4, True, SamplingParams(temperature=1.0)),
    "multi-seq-gamma2-t0.7-topk-topp": (2, True, SamplingParams(temperature=0.7, top_k=5, top_p=0.9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipelined_sampling_matches_target_distribution(case):
    gamma, multi, params = CASES[case]
    target_model = small_vocab_model(0)
    prompt = [3, 5, 3, 5, 3]
    exact = exact_sequence_probs(target_model, prompt, params)               # [V, V, V, V]
    # The drafter's logits flattened: its alternatives beat lp12 often, so rounds have several sequences.
    drafter_model = small_vocab_model(1)
    with torch.no_grad():
        drafter_model.lm_head.weight.mul_(0.15)
    engine = duo(ModelRunner(target_model), ModelRunner(drafter_model), gamma=(gamma, gamma, gamma), multi=multi)
    gen = torch.Generator().manual_seed(0)
    outs = torch.empty(SAMPLES, N_NEW, dtype=torch.long)
    used = trees = 0
    for i in range(SAMPLES):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        res = engine.generate(prompt, N_NEW, SamplingParams(params.temperature, params.top_k, params.top_p, seed))
        outs[i] = torch.tensor(res.tokens)
        used += res.stats.speculative_used
    side = engine.drafter.side
    for i in range(20):       # the drafts really have several sequences in this setting
        side.open("probe", prompt, SamplingParams(params.temperature, params.top_k, params.top_p, i))
        trees += len(side.draft("probe", prompt, gamma, multi).sequences) > 1
    assert used > SAMPLES // 4, f"{case}: too few pipelined drafts used to test them"
    assert trees > 0 or not multi
    # The first token (round 0's guess), and pairs covering the later rounds.
    for dims, cols in [((1, 2, 3), (0,)), ((0, 3), (1, 2)), ((0, 1), (2, 3)), ((0, 1, 2), (3,))]:
        probs = exact.sum(dim=dims).reshape(-1)
        ids = sum(outs[:, c] * V ** (len(cols) - 1 - j) for j, c in enumerate(cols))
        p_value = chi_square_p_value(ids, probs)
        assert p_value > 1e-3, f"{case}: tokens {cols} deviate from the target (p={p_value:.2e})"


# ------------------------------------------------------------------ GPU readings
class FakeNvml:
    """A stand-in for the pynvml module: the calls GpuMonitor makes, two devices."""

    def __init__(self, count=2, init_error: Exception | None = None):
        self.count, self.init_error, self.lost = count, init_error, False

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"h{i}"

    def nvmlDeviceGetUtilizationRates(self, handle):
        if self.lost:
            raise RuntimeError("GPU is lost")
        return SimpleNamespace(gpu=37 if handle == "h0" else 90, memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=2e9, total=80e9, free=78e9)


def no_gpu_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no GPU" in r.getMessage()]


def test_gpu_monitor_without_the_nvml_library_says_so_once_and_reads_nothing(monkeypatch, caplog):
    from orchestrator.gpu_stats import GpuMonitor

    monkeypatch.setitem(sys.modules, "pynvml", None)      # `import pynvml` raises ImportError
    monitor = GpuMonitor()
    with caplog.at_level("INFO", logger="orchestrator.gpu_stats"):
        assert monitor.read() is None
        assert monitor.read() is None
        assert not monitor.available
    (message,) = no_gpu_messages(caplog)
    assert "ImportError" in message or "ModuleNotFoundError" in message


@pytest.mark.parametrize("nvml", ["init-raises", "no-devices"])
def test_gpu_monitor_without_a_driver_says_so_once_and_reads_nothing(nvml, caplog):
    import pynvml    # nvidia-ml-py is a dependency: importing works with or without a GPU

    from orchestrator.gpu_stats import GpuMonitor

    # What pynvml raises on a machine without the NVIDIA driver library.
    fake = (FakeNvml(init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)) if nvml == "init-raises"
            else FakeNvml(count=0))
    monitor = GpuMonitor(fake)
    with caplog.at_level("INFO", logger="orchestrator.gpu_stats"):
        assert monitor.read() is None
        assert monitor.read() is None
        assert not monitor.available
    (message,) = no_gpu_messages(caplog)
    assert ("NVMLError" in message) if nvml == "init-raises" else ("no devices" in message)


def test_gpu_monitor_reads_utilisation_and_memory_and_stops_when_a_device_is_lost(caplog):
    from orchestrator.gpu_stats import GpuMonitor

    fake = FakeNvml()
    monitor = GpuMonitor(fake)
    assert monitor.available
    first, second = monitor.read()
    assert (first.utilization_pct, first.memory_used_gb, first.memory_total_gb) == (37, 2.0, 80.0)
    assert str(first) == "gpu0: 37% busy, 2.0/80.0 GB" and str(second) == "gpu1: 90% busy, 2.0/80.0 GB"
    fake.lost = True
    with caplog.at_level("INFO", logger="orchestrator.gpu_stats"):
        assert monitor.read() is None                  # decoding goes on without readings
    assert not monitor.available and any("stopped" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("nvml", ["fake-gpus", "init-raises"])
def test_engine_records_gpu_readings_when_there_is_a_gpu(target_model, draft_model, prompts, nvml):
    from orchestrator.gpu_stats import GpuMonitor

    target = ModelRunner(target_model)
    engine = duo(target, ModelRunner(draft_model))
    engine.gpu = GpuMonitor(FakeNvml() if nvml == "fake-gpus" else FakeNvml(init_error=RuntimeError("no driver")))
    res = engine.generate(prompts[0], 4)
    assert res.tokens == SpeculativeEngine(target, None).generate(prompts[0], 4).tokens
    readings = [e for e in res.stats.events if e.startswith(GPU_READING)]
    if nvml == "fake-gpus":
        assert readings == [GPU_READING + "gpu0: 37% busy, 2.0/80.0 GB; gpu1: 90% busy, 2.0/80.0 GB"]
    else:
        assert readings == []
    assert not fault_events(res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and its driver")
def test_real_nvml_reads_this_machines_gpus():
    from orchestrator.gpu_stats import GpuMonitor

    readings = GpuMonitor().read()
    assert readings and len(readings) >= torch.cuda.device_count()
    assert all(0 <= r.utilization_pct <= 100 and 0 < r.memory_total_gb for r in readings)


# ------------------------------------------------------------------ config
def test_config_errors_name_the_key(tmp_path):
    from core.config import ConfigError
    from orchestrator.config import load_config

    def load(strategy: dict):
        cfg = {"models": {"target": {"source": "t"}, "drafters": {"d": {"source": "d"}}},
               "strategies": [{"name": "duo", "kind": "duodecoding", "drafter": "d", **strategy}]}
        path = tmp_path / "c.yaml"
        path.write_text(__import__("yaml").safe_dump(cfg))
        return load_config(path)

    assert load({}).strategies[0].process == "actor"
    with pytest.raises(ConfigError, match="gamma_min <= gamma_init <= gamma_max"):
        load({"gamma_init": 20, "gamma_max": 16})
    with pytest.raises(ConfigError, match="strategies.0.duodecoding.gama"):
        load({"gama": 3})
    with pytest.raises(ConfigError, match="strategies.0.drafter"):
        load({"drafter": "nope"})
    assert load({"backend": "llama_cpp"}).strategies[0].backend == "llama_cpp"
    with pytest.raises(ConfigError, match="strategies.0.duodecoding.backend"):
        load({"backend": "onnx"})


def test_a_failing_drafter_costs_speed_not_the_request(target_model, draft_model, prompts):
    class FailingSide(DuoDrafterSide):
        calls = 0

        def draft(self, *args):
            FailingSide.calls += 1
            if FailingSide.calls == 3:
                raise RuntimeError("drafter process died")
            return super().draft(*args)

    target = ModelRunner(target_model)
    engine = DuoEngine(target, InProcessDrafterClient(FailingSide(ModelRunner(draft_model))),
                       DraftBudgetController(4, 4, 4), calibration_steps=0)
    res = engine.generate(prompts[0], 20)
    assert res.tokens == SpeculativeEngine(target, None).generate(prompts[0], 20).tokens
    assert len([e for e in res.stats.events if "drafter failed" in e]) == 1


def test_concurrent_requests_through_the_global_verifier_decode_like_plain(target_model, draft_model, prompts):
    """The server's setup: one engine, requests in threads, target forwards batched by the global verifier."""
    import threading

    from orchestrator.global_verifier import GlobalVerifier

    target = ModelRunner(target_model)
    expected = [SpeculativeEngine(target, None).generate(p, 16).tokens for p in prompts]
    verifier = GlobalVerifier(ModelRunner(target_model), max_batch=4)
    try:
        engine = duo(target, ModelRunner(draft_model), gamma=(4, 2, 6), overlap=True).with_target(verifier)
        got: list = [None] * len(prompts)
        runs: list = [None] * len(prompts)

        def run(i):
            runs[i] = engine.generate(prompts[i], 16)
            got[i] = runs[i].tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == expected
        assert_drafted(runs)
    finally:
        verifier.close()
