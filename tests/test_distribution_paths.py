"""Seeded sampling follows the target's distribution on every execution path a user can pick.

One engine-level test, run over each path: in process (`build_engines`: draft model, a cascade of two
drafters and MaG, EasySpec, DuoDecoding inline with and without multi-sequence drafts), and through
Ray (`place`: the drafter in a drafter actor, a one-drafter cascade in it, distributed EasySpec over
two rank actors, DuoDecoding's drafter actor with and without multi-sequence drafts; the target in
one stage actor, over two pipeline stages, and tensor-parallel over two ranks).

Each request carries its own seed, as a client's would. The target has an 8-token vocabulary, so the
exact joint distribution of the first four generated tokens is computed by enumeration, and the
sampled outputs are compared with it by chi-square tests: the first token alone, the pairs
(t1, t2), (t2, t3) and (t3, t4), and the joint of the first three. The first token is included on purpose: a drafter
whose random stream equals the verifier's proposes, as its first draft token, a token coupled to the
target's own first sample, which only the joint with t1 shows.

The negative controls run the same test on broken engines and require it to reject each: an
accept-always verifier, a drafter that reports a q other than the one it sampled from, and a drafter
whose random stream is the verifier's (the bug this test was written for).
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from core.sampling import SamplingParams, warp_probs
from orchestrator.build import build_engines
from orchestrator.config import load_config
from tests.test_verification import chi_square_p_value

V = 8            # vocabulary
N_NEW = 4        # tokens per request: t1 (the prefill's sample), then speculative steps
# Seeded requests per path. At 300 the negative controls below are still rejected with p < 1e-14 (accept-always
# 8e-53, misreported q 6e-37, shared random stream 9e-15; at 200 the last was only 2e-7).
SAMPLES = 300
PROMPT = [3, 5, 3, 5, 3]
PARAMS = SamplingParams(temperature=1.0)
ALPHA = 1e-4     # each check; a broken path gives p-values below 1e-10 (see the negative controls)
MARGINALS = [(0,), (0, 1), (1, 2), (2, 3), (0, 1, 2)]
GREEDY_PROMPTS = [PROMPT, [1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0]]
LETTERS = list("abcdefgh")[:V]     # the text the tokenizers of the cross-vocabulary models spell


def small_model(seed: int, layers: int):
    """A Llama with an 8-token vocabulary and peaked, context-dependent distributions; its head
    counts divide by 2 so it can be split tensor-parallel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=V + 1, tie_word_embeddings=False)   # no stop token
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    model.generation_config.eos_token_id = V + 1
    return model.float().eval()


def exact_joint(model, prompt: list[int], params: SamplingParams, n: int = N_NEW) -> torch.Tensor:
    """P(t1..tn) of every sequence, from the target's warped next-token distributions: [V] * n."""
    seqs: list[tuple] = [()]
    joint = torch.ones(1, dtype=torch.float64)
    for _ in range(n):
        batch = torch.tensor([prompt + list(s) for s in seqs])
        with torch.inference_mode():
            p = warp_probs(model(batch).logits[:, -1], params).double()        # [len(seqs), V]
        joint = (joint.unsqueeze(1) * p).reshape(-1)
        seqs = [s + (t,) for s in seqs for t in range(V)]
    return joint.reshape([V] * n)


def p_values(outs: torch.Tensor, exact: torch.Tensor) -> dict[tuple, float]:
    """outs: [samples, N_NEW] generated tokens -> chi-square p-value of each marginal in MARGINALS."""
    result = {}
    for cols in MARGINALS:
        others = tuple(d for d in range(N_NEW) if d not in cols)
        probs = (exact.sum(dim=others) if others else exact).reshape(-1)
        ids = sum(outs[:, c] * V ** (len(cols) - 1 - j) for j, c in enumerate(cols))
        result[cols] = chi_square_p_value(ids, probs)
    return result


def sample_outputs(engine, samples: int = SAMPLES, params: SamplingParams = PARAMS, workers: int = 1,
                   prompt: list[int] = PROMPT):
    """`samples` requests, request i seeded with 1000 + i; returns ([samples, N_NEW] first tokens, stats).
    DuoDecoding requests run for 2 * N_NEW tokens: its first rounds forward the pending token alone while
    the drafter drafts past it, so its drafts reach the first N_NEW tokens only in longer requests."""
    max_new = 2 * N_NEW if "duo" in engine.name else N_NEW

    def one(i: int):
        res = engine.generate(prompt, max_new, SamplingParams(params.temperature, params.top_k, params.top_p,
                                                               seed=1000 + i))
        return res.tokens[:N_NEW], res.stats

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, range(samples)))
    else:
        results = [one(i) for i in range(samples)]
    outs = torch.tensor([tokens for tokens, _ in results])
    return outs, [stats for _, stats in results]


def assert_follows_target(outs, stats, exact, what: str) -> None:
    assert outs.shape[1] == N_NEW
    # The path must really speculate: drafts made and accepted, no drafter fallback.
    # (DuoDecoding's pipelined drafts count: their first tokens are verified at the bonus position.)
    drafted = sum(s.drafted_tokens + getattr(s, "speculative_used", 0) for s in stats)
    accepted = sum(s.accepted_tokens + getattr(s, "speculative_used", 0) for s in stats)
    events = [e for s in stats for e in s.events]
    assert not events, f"{what}: {events[0]}"
    assert drafted > len(stats) // 2, f"{what}: only {drafted} draft tokens in {len(stats)} requests"
    assert accepted > len(stats) // 4, f"{what}: only {accepted} draft tokens accepted"
    bad = {cols: p for cols, p in p_values(outs, exact).items() if p < ALPHA}
    assert not bad, f"{what}: tokens deviate from the target distribution (p-values {bad})"


# ------------------------------------------------------------------ models and configs
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-models")
    small_model(0, layers=2).save_pretrained(root / "target")
    small_model(1, layers=2).save_pretrained(root / "draft")       # EasySpec groups its 2 layers
    small_model(2, layers=1).save_pretrained(root / "draft-small")
    from workers.vocab_trim import count_tokens, save_frequency_table   # VocabTrim's table: 6, 2, 7 most frequent
    save_frequency_table(count_tokens([[6, 6, 6, 2, 2, 7]]), root / "vocab-table.pt")
    from core.length_predictor import init_predictor, save_predictor   # learned draft length: 2 x hidden 32 features
    predictor = init_predictor(64, 3, 8, torch.Generator().manual_seed(0))
    predictor.w1 *= 8.0                                                   # lengths that vary with the state
    predictor.w2 *= 8.0
    save_predictor(predictor, root / "draft-length.pt")
    # Cross-vocabulary drafting: the target spells letters; the drafter is the target behind permuted ids, the
    # same letters in its own ids (an oracle: a right mapping gets every greedy draft accepted). Neither
    # tokenizer has an end-of-sequence token: requests run N_NEW tokens.
    from tests.test_cross_vocab import permuted, shuffled_ids, tokenizer
    tokenizer(LETTERS, specials=[]).save_pretrained(root / "target")
    perm = shuffled_ids(V, 0, seed=3)
    permuted(small_model(0, layers=2), perm).save_pretrained(root / "draft-xv")
    tokenizer([LETTERS[i] for i in perm], specials=[]).save_pretrained(root / "draft-xv")
    return root


@pytest.fixture(scope="module")
def exact(model_dir):
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir / "target", torch_dtype=torch.float32).eval()
    return exact_joint(target, PROMPT, PARAMS)


DUO = {"kind": "duodecoding", "drafter": "d", "gamma_init": 6, "gamma_min": 6, "gamma_max": 6,
       "calibration_steps": 0}


def write_config(root, name: str, strategies: list[dict], placement: dict | None = None, cpus: int = 8):
    cfg = {
        "name": name,
        "models": {"target": {"source": str(root / "target"), "dtype": "float32"},
                   "drafters": {"d": {"source": str(root / "draft"), "dtype": "float32"},
                                "d-small": {"source": str(root / "draft-small"), "dtype": "float32"},
                                "d-xv": {"source": str(root / "draft-xv"), "dtype": "float32"}}},
        "strategies": strategies,
        "runtime": {"device": "cpu", "threads": 1},
        "server": {"concurrency": 4},
    }
    if placement is not None:
        cfg["node_pools"] = [{"name": "local", "count": 1, "cpus": cpus, "memory_gb": 8}]
        cfg["placement"] = placement
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("{models}", str(root)))     # files beside the models
    return load_config(path)


# Tree drafters run both in process and through Ray, with the same settings. Through Ray the model-free
# ones (hierarchy, token recycling) draft beside the engine, their state shared by the concurrent requests,
# token recycling's matrix fed by the logits the stage actor returns; the others draft in the drafter actor,
# Ouroboros' pool there too (fed the target's argmax rows with the feedback).
TREE_DRAFTERS = [
    # no model: three candidates from the context and the recent generations, one tree (workers/hierarchy.py)
    {"name": "hierarchy", "kind": "hierarchy", "num_candidates": 3, "draft_length": {"policy": "fixed", "k": 2}},
    {"name": "token-recycling", "kind": "token_recycling", "draft_length": {"policy": "fixed", "k": 3}},
    # the draft model's adaptive tree (workers/opt_tree.py): nodes chosen from the warped q, verified one-hot
    {"name": "opt-tree", "kind": "opt_tree", "drafter": "d", "max_nodes": 6, "width": 3,
     "draft_length": {"policy": "fixed", "k": 3}},
    # RASD (workers/rasd.py): the draft model's tree fused with context retrievals it scored and pruned
    {"name": "rasd", "kind": "rasd", "drafter": "d", "max_nodes": 8, "draft_nodes": 4, "width": 2,
     "min_ngram": 1, "prune_threshold": 0.05, "draft_length": {"policy": "fixed", "k": 3}},
    # the model's sampled chain (its q) extended by one-hot phrases of the shared pool, one tree
    {"name": "ouroboros", "kind": "ouroboros", "drafter": "d", "candidates": 3, "phrase_len": 3,
     "draft_length": {"policy": "fixed", "k": 2}},
]

# AdaEAGLE's learned draft length: each draft's length from an MLP over the drafter's state (0 to 3); through
# Ray the predictor runs in the drafter actor, beside the hidden states it reads.
LEARNED = {"name": "sd-learned", "kind": "draft_model", "drafter": "d",
           "draft_length": {"policy": "learned", "weights": "{models}/draft-length.pt", "k_min": 0, "k_max": 3}}

IN_PROCESS = [
    {"name": "sd", "kind": "draft_model", "drafter": "d", "draft_length": {"policy": "fixed", "k": 2}},
    {"name": "cascade2", "kind": "cascade", "drafters": ["d", "d-small"], "k_matrix": [[2, 1, 1], [0, 2, 1],
                                                                                       [0, 0, 2]]},
    {"name": "easyspec", "kind": "easyspec", "drafter": "d", "groups": [[0, 1]],
     "draft_length": {"policy": "fixed", "k": 2}},
    {"name": "sd-goodput", "kind": "draft_model", "drafter": "d", "draft_length": {"policy": "goodput", "k_max": 3}},
    {"name": "duo-multi", "process": "inline", "multi_sequence": True, "top_alternatives": 2, **DUO},
    {"name": "duo-chain", "process": "inline", "multi_sequence": False, **DUO},
    *TREE_DRAFTERS,
    # VocabTrim's frequency mode: q = 0 outside the table's top 2 (6, 2) and the prompt's tokens (3, 5)
    {"name": "sd-vocab-freq", "kind": "draft_model", "drafter": "d",
     "draft_vocab": {"size": 2, "mode": "frequency", "table": "{models}/vocab-table.pt"},
     "draft_length": {"policy": "fixed", "k": 2}},
    LEARNED,
]


@pytest.fixture(scope="module")
def in_process(model_dir):
    from orchestrator.goodput import StepCostModel
    from orchestrator.goodput_guard import ModeGuard

    built = build_engines(write_config(model_dir, "in-process", IN_PROCESS))
    # Tiny models cost mostly Python overhead, the drafter as much as the target, so measured costs would
    # (rightly) stop the goodput scheduler drafting; a profile of a weight-bound target keeps it drafting.
    built.scheduler.cost = StepCostModel(prior=(0.05, 1e-4, 0.0), prior_weight=1e6, decay=1.0)
    # Likewise its measured check (orchestrator/goodput_guard.py) would hold drafting back behind the global
    # verifier; with a margin of -100% drafting always measures good enough once the plain baseline exists.
    built.scheduler.guard = ModeGuard(margin=-1.0)
    # And its sessions open at start, as a drafter actor's do at their start call: opened at the first draft
    # (build.py, in process), a request of a few tokens never pays back the measured opening, so the plan
    # (rightly) lets none open and none would draft here.
    built.engines["sd-goodput"].drafter.opens_lazily = False
    return built


@pytest.mark.parametrize("strategy", [s["name"] for s in IN_PROCESS])
def test_in_process_paths_follow_the_target(in_process, exact, strategy):
    outs, stats = sample_outputs(in_process.engines[strategy])
    assert_follows_target(outs, stats, exact, f"in process, {strategy}")


@pytest.mark.parametrize("batching", ["lockstep", "cohorts", "wait_for_drafting"])
def test_concurrent_requests_through_the_global_verifier_follow_the_target(in_process, exact, batching):
    """The server's path: four requests at a time, their target forwards batched by the global
    verifier, their draft lengths chosen together by the goodput scheduler it feeds; verified as two
    alternating cohorts (core/cohorts.py), as the scheduler does with a drafter of its own; or with the
    verifier waiting for drafting requests, as it does where a drafter shares the target's cores."""
    from orchestrator.global_verifier import GlobalVerifier

    verifier = GlobalVerifier(in_process.target, max_batch=4)
    verifier.observers.append(in_process.scheduler.observe_forward)
    verifier.split_hints.append(lambda: batching == "cohorts")
    verifier.wait_for_drafting = batching == "wait_for_drafting"
    try:
        engine = in_process.engines["sd-goodput"].with_target(verifier)
        outs, stats = sample_outputs(engine, workers=4)
    finally:
        verifier.close()
    assert verifier.stats.max_rows > 1
    assert_follows_target(outs, stats, exact, "global verifier, goodput scheduler, 4 concurrent requests")


# ------------------------------------------------------------------ negative controls (in process)
@pytest.fixture
def draft_model_engine(in_process):
    return in_process.engines["sd"]


def assert_rejected(outs, exact, what: str) -> None:
    pvals = p_values(outs, exact)
    assert min(pvals.values()) < 1e-10, f"{what}: the distribution test did not catch it ({pvals})"


def test_rejects_an_accept_always_verifier(draft_model_engine, exact, monkeypatch):
    from core.sampling import sample
    from core.verification import ChainResult
    import orchestrator.engine as engine_module

    def accept_all(draft_tokens, draft_probs, target_probs, generator):
        return ChainResult(len(draft_tokens), int(sample(target_probs[len(draft_tokens)], generator)))

    monkeypatch.setattr(engine_module, "verify_chain", accept_all)
    outs, _ = sample_outputs(draft_model_engine)
    assert_rejected(outs, exact, "accept-always verifier")


def test_rejects_a_drafter_that_misreports_q(draft_model_engine, exact, monkeypatch):
    import orchestrator.engine as engine_module

    real = engine_module.verify_chain

    def uniform_q(draft_tokens, draft_probs, target_probs, generator):   # the drafter says "uniform"
        wrong = None if draft_probs is None else torch.full_like(draft_probs, 1.0 / V)
        return real(draft_tokens, wrong, target_probs, generator)

    monkeypatch.setattr(engine_module, "verify_chain", uniform_q)
    outs, _ = sample_outputs(draft_model_engine)
    assert_rejected(outs, exact, "misreported q")


def test_rejects_a_drafter_sharing_the_verifiers_random_stream(draft_model_engine, exact, monkeypatch):
    import core.sampling as sampling

    monkeypatch.setattr(sampling, "stream_seed", lambda seed, role: seed)   # every role: the same stream
    outs, _ = sample_outputs(draft_model_engine)
    assert_rejected(outs, exact, "drafter stream == verifier stream")


# ------------------------------------------------------------------ the llama.cpp drafter
def support_joint(model, prompt: list[int], params: SamplingParams, n: int) -> dict[tuple, float]:
    """P(t1..tn) of every sequence the warped target can produce (top-k keeps the tree small)."""
    joint = {(): 1.0}
    for _ in range(n):
        seqs = list(joint)
        with torch.inference_mode():
            p = warp_probs(model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1], params).double()
        joint = {s + (int(t),): joint[s] * float(p[i, t]) for i, s in enumerate(seqs) for t in p[i].nonzero()[:, 0]}
    return joint


def p_values_sparse(outs: torch.Tensor, joint: dict[tuple, float]) -> dict[tuple, float]:
    """As p_values, over the support of the target's joint distribution."""
    result = {}
    for cols in MARGINALS:
        marginal: dict[tuple, float] = {}
        for seq, prob in joint.items():
            key = tuple(seq[c] for c in cols)
            marginal[key] = marginal.get(key, 0.0) + prob
        cells = {key: i for i, key in enumerate(marginal)}
        ids = [cells.get(tuple(int(row[c]) for c in cols), len(cells)) for row in outs]
        probs = torch.tensor(list(marginal.values()) + [0.0])              # last cell: impossible outcomes
        result[cols] = chi_square_p_value(torch.tensor(ids), probs)
    return result


@pytest.mark.slow
def test_llama_cpp_drafter_follows_the_target():
    """DuoDecoding with llama.cpp drafting from the embedded SmolLM2 GGUF for the same model in torch
    float32 (vocabulary 49,152: top_k = 3 keeps the exact joint enumerable)."""
    pytest.importorskip("llama_cpp")
    from core.duo_policy import DraftBudgetController
    from orchestrator.duo import DuoEngine, InProcessDrafterClient
    from workers.duo_drafter import DuoDrafterSide
    from workers.llama_cpp_drafter import LlamaCppDraftModel
    from workers.model_store import load_model
    from workers.runner import ModelRunner

    model, tokenizer = load_model("smollm2-135m", torch.float32)
    prompt = tokenizer("def add(a, b):\n    return", return_tensors=None)["input_ids"]
    params = SamplingParams(temperature=1.0, top_k=3)
    joint = support_joint(model, prompt, params, N_NEW)
    runner = ModelRunner(model)
    drafter = LlamaCppDraftModel("smollm2-135m", runner.vocab_size, threads=1, n_ctx=512)
    engine = DuoEngine(runner, InProcessDrafterClient(DuoDrafterSide(drafter, top_alternatives=2)),
                       DraftBudgetController(4, 4, 4), name="duo-llama", calibration_steps=0)
    outs, stats = sample_outputs(engine, samples=200, params=params, prompt=prompt)
    drafted = sum(s.drafted_tokens + s.speculative_used for s in stats)
    accepted = sum(s.accepted_tokens + s.speculative_used for s in stats)
    assert drafted > 100 and accepted > 50 and not [e for s in stats for e in s.events], (drafted, accepted)
    bad = {cols: p for cols, p in p_values_sparse(outs, joint).items() if p < ALPHA}
    assert not bad, f"llama.cpp drafter: tokens deviate from the target distribution (p-values {bad})"


# ------------------------------------------------------------------ through Ray
ray = pytest.importorskip("ray")

# OmniDraft: d-xv drafts in its own ids in d's actor (colocated), its drafts spelled in the target's
CROSS_VOCAB = {"name": "cross-vocab", "kind": "cross_vocab", "drafter": "d-xv", "target_tokenizer": "{models}/target",
               "draft_length": {"policy": "fixed", "k": 2}}

RAY_STRATEGIES = [
    {"name": "sd", "kind": "draft_model", "drafter": "d", "draft_length": {"policy": "fixed", "k": 2}},
    {"name": "cascade1", "kind": "cascade", "drafters": ["d"], "k_matrix": [[2, 1], [0, 2]]},
    # a hybrid: lookup beside the engine, the model in the drafter actor
    {"name": "hybrid", "kind": "draft_model", "drafter": "d", "lookup_first": {"max_ngram": 2, "min_ngram": 2, "k": 3},
     "draft_length": {"policy": "fixed", "k": 2}},
    {"name": "easyspec-2workers", "kind": "easyspec", "drafter": "d", "groups": [[0, 1]], "workers": 2,
     "draft_length": {"policy": "fixed", "k": 2}},
    {"name": "duo-actor-multi", "process": "actor", "multi_sequence": True, "top_alternatives": 2, **DUO},
    {"name": "duo-actor-chain", "process": "actor", "multi_sequence": False, **DUO},
    *TREE_DRAFTERS,
    LEARNED,
    CROSS_VOCAB,
]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=12, resources={"pool:local": 1000.0}, include_dashboard=False, log_to_driver=False,
             namespace="specorch-dist-test")
    yield
    ray.shutdown()


def placed(root, name: str, strategies: list[dict], pipeline: int = 1, tp: int = 1):
    from orchestrator.ray_runtime import place
    from placement.plan import plan_placement

    placement = {"target": {"pool": "local", "device": "cpu", "pipeline_parallel": pipeline,
                            "tensor_parallel": tp},
                 "drafters": {"d": {"pool": "local", "device": "cpu", "cpus": 1, "colocate": ["d-xv"]}}}
    cfg = write_config(root, name, strategies, placement)
    return place(cfg, plan_placement(cfg), name=f"test-{name}")


@pytest.fixture(scope="class")
def one_stage(model_dir, ray_cluster):
    """Actor names are fixed by the plan: one placement at a time, so this one ends with its class."""
    built, runtime = placed(model_dir, "ray-1stage", RAY_STRATEGIES)
    yield built
    runtime.shutdown()


class TestOneStageTarget:
    """The target in one stage actor; the drafters in their actors."""

    @pytest.mark.parametrize("strategy", [s["name"] for s in RAY_STRATEGIES])
    def test_ray_paths_follow_the_target(self, one_stage, exact, strategy):
        outs, stats = sample_outputs(one_stage.engines[strategy], workers=4)
        assert_follows_target(outs, stats, exact, f"Ray, {strategy}")

    def test_ray_cross_vocab_greedy_equals_plain_every_draft_accepted(self, one_stage):
        """d-xv (the target behind permuted ids) drafts in d's actor and spells every greedy draft right. A dead
        drafter (a strategy the actor does not host) gives the same output: assert_drafted tells them apart."""
        from orchestrator.engine import SpeculativeEngine
        from orchestrator.ray_runtime import RemoteDrafter
        from tests.drafting import assert_drafted

        plain = [one_stage.engines["plain"].generate(p, 12).tokens for p in GREEDY_PROMPTS]

        def run(engine):
            results = [engine.generate(p, 12) for p in GREEDY_PROMPTS]
            assert [r.tokens for r in results] == plain
            return results
        cross = one_stage.engines["cross-vocab"]
        assert_drafted(run(cross), all_accepted=True, what="Ray, cross-vocab")
        dead = SpeculativeEngine(cross.target, RemoteDrafter(cross.drafter.workers, "no-such-strategy", 30.0),
                                 cross.policy_factory, name="dead")
        with pytest.raises(AssertionError, match="fell back"):
            assert_drafted(run(dead))

    def test_ray_learned_length_is_chosen_in_the_drafter_actor(self, one_stage, model_dir):
        """The engine asks for k_max; the predictor in the actor cuts each draft as the in-process drafter does
        (the same lengths step by step, several of them). Broken, the actor drafting k_max: caught."""
        fixed = {**LEARNED, "name": "sd-k3", "draft_length": {"policy": "fixed", "k": 3}}
        local = build_engines(write_config(model_dir, "learned-local", [LEARNED, fixed]))

        def lengths(engine):
            return [engine.generate(p, 12).stats.draft_lengths for p in GREEDY_PROMPTS]
        through_ray = lengths(one_stage.engines["sd-learned"])
        assert through_ray == lengths(local.engines["sd-learned"])
        assert len({k for steps in through_ray for k in steps}) > 1, through_ray
        assert through_ray != lengths(local.engines["sd-k3"])


def test_ray_rejects_a_wrong_target_tokenizer_on_the_driver(model_dir, ray_cluster):
    """In a drafter actor an error would only kill the actor (requests decode target-only, unreported), so the
    tokenizers are checked on the driver, before the actors start. (Without the check a wrong map drafts,
    also unreported: the broken version in tests/test_cross_vocab_tokenizers.py.)"""
    from core.config import ConfigError

    wrong = {**CROSS_VOCAB, "target_tokenizer": "{models}/draft-xv"}     # the drafter's own tokenizer
    with pytest.raises(ConfigError, match=r"strategy 'cross-vocab': target_tokenizer .*draft-xv is not the tokenizer "
                                          r"of models.target.source .*target \(\d of 8 tokens have other ids\)"):
        placed(model_dir, "ray-wrong-xv", [wrong])


def test_ray_placement_fails_when_a_drafter_actor_cannot_start(model_dir, tmp_path, ray_cluster, monkeypatch):
    """An actor hosting only cross_vocab strategies (no vocabulary compared with the target's) whose drafter
    cannot be built: the placement fails with the drafter's error. (Before, nothing asked that actor before
    the first draft: the placement succeeded and its requests decoded target-only.) The driver's tokenizer
    check is switched off so the error happens in the actor."""
    import shutil

    from orchestrator.strategies.cross_vocab import CrossVocabStrategy

    for model in ("target", "draft", "draft-small", "draft-xv"):
        shutil.copytree(model_dir / model, tmp_path / model)
    for f in (tmp_path / "draft-xv").glob("tokenizer*"):
        f.unlink()
    monkeypatch.setattr(CrossVocabStrategy, "check_tokenizers", lambda self, config, target_tokenizer: None)
    with pytest.raises(ray.exceptions.RayActorError, match=r"models.drafters.d-xv.source .*draft-xv: no tokenizer"):
        placed(tmp_path, "ray-xv-no-tokenizer", [CROSS_VOCAB])


@pytest.mark.parametrize("pipeline, tp", [(2, 1), (1, 2)])
def test_split_targets_follow_the_target(model_dir, ray_cluster, exact, pipeline, tp):
    built, runtime = placed(model_dir, f"ray-pp{pipeline}-tp{tp}", RAY_STRATEGIES[:1], pipeline, tp)
    try:
        assert len(built.target.shards) == pipeline * tp
        outs, stats = sample_outputs(built.engines["sd"], workers=4)
        assert_follows_target(outs, stats, exact, f"Ray, {pipeline} stage(s) x tensor-parallel {tp}")
    finally:
        runtime.shutdown()
