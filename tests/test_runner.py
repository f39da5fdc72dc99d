"""Model runner: exact against HF's forward in float32; rollback, trees, compaction, unequal batches."""
from __future__ import annotations

import copy

import pytest
import torch

from orchestrator.engine import tree_attention
from workers.kernels import (LINEAR_KERNELS, ROW_BUCKETS, KernelChoice, best_seconds_interleaved, bucket, dense_linears,
                             fastest, padded_up, timed_linears, wide_weight)
from workers.runner import ModelRunner, _linear


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def test_prefill_and_chain_match_hf(target_model, prompts):
    runner = ModelRunner(target_model)
    ids = prompts[1]
    cache = runner.new_cache(1, capacity=8)              # forces the cache to grow
    got = runner.forward(cache, torch.tensor([ids[:10]]))[0]
    got2 = runner.forward(cache, torch.tensor([ids[10:]]))[0]
    ref = hf_logits(target_model, ids)
    torch.testing.assert_close(torch.cat([got, got2]), ref, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [len(ids)]


def test_rollback_restores_state(target_model, prompts):
    runner = ModelRunner(target_model)
    ids = prompts[2]
    cache = runner.new_cache(1, 64)
    runner.forward(cache, torch.tensor([ids]))
    cache.crop(0, 12)
    # Overwrite slots 12.. with garbage tokens, roll back again, then continue with the real ones.
    runner.forward(cache, torch.tensor([[5, 6, 7, 8]]))
    cache.crop(0, 12)
    got = runner.forward(cache, torch.tensor([ids[12:]]))[0]
    torch.testing.assert_close(got, hf_logits(target_model, ids)[12:], rtol=1e-5, atol=1e-5)


def test_tree_forward_and_compaction(target_model, prompts):
    """Each tree node's logits equal the logits of its root-to-node chain; compacting a path
    leaves exactly the KV a chain forward over that path would have left."""
    runner = ModelRunner(target_model)
    prefix = prompts[1][:9]
    root = prompts[1][9]
    tokens = [11, 12, 13, 21, 22, 31]
    parents = [-1, 0, 1, -1, 3, 0]          # two branches from the root, one fork at node 0
    cache = runner.new_cache(1, 64)
    runner.forward(cache, torch.tensor([prefix]))
    mask, depths = tree_attention(parents, "cpu")
    logits = runner.forward(cache, torch.tensor([[root] + tokens]), depths=depths[None], tree_mask=mask[None])[0]

    def path_to(i):
        out = []
        while i >= 0:
            out.append(tokens[i])
            i = parents[i]
        return out[::-1]

    for i in range(len(tokens)):
        ref = hf_logits(target_model, prefix + [root] + path_to(i))[-1]
        torch.testing.assert_close(logits[i + 1], ref, rtol=1e-5, atol=1e-5)

    # accept the path root -> node 3 -> node 4, then continue decoding after it
    cache.keep(0, len(prefix), torch.tensor([0, 4, 5]))
    assert cache.lengths == [len(prefix) + 3]
    nxt = runner.forward(cache, torch.tensor([[7]]))[0, -1]
    ref = hf_logits(target_model, prefix + [root, 21, 22, 7])[-1]
    torch.testing.assert_close(nxt, ref, rtol=1e-5, atol=1e-5)


def test_batch_of_unequal_lengths(target_model, prompts):
    """Rows with different cached lengths and different numbers of new tokens in one forward."""
    runner = ModelRunner(target_model)
    a, b = prompts[0], prompts[2]
    cache = runner.new_cache(2, 64)
    # prefill the two rows separately by padding the shorter one
    t = max(len(a), len(b))
    pad = lambda s: s + [0] * (t - len(s))  # noqa: E731
    runner.forward(cache, torch.tensor([pad(a[:-2]), pad(b[:-3])]), num_new=[len(a) - 2, len(b) - 3])
    assert cache.lengths == [len(a) - 2, len(b) - 3]
    logits = runner.forward(cache, torch.tensor([a[-2:] + [0], b[-3:]]), num_new=[2, 3])
    torch.testing.assert_close(logits[0, :2], hf_logits(target_model, a)[-2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1, :3], hf_logits(target_model, b)[-3:], rtol=1e-5, atol=1e-5)
    assert cache.lengths == [len(a), len(b)]


def test_every_linear_kernel_matches_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=True).to(torch.bfloat16)
    for kernel in LINEAR_KERNELS:
        for rows in (1, 5):
            x = torch.randn(1, rows, 48, dtype=torch.bfloat16)
            torch.testing.assert_close(_linear(x, layer, kernel).float(), layer(x).float(), rtol=2e-2, atol=2e-2)


def test_converted_kernel_covers_every_block(monkeypatch):
    """`converted` multiplies the weight block by block: a block of 7 rows over 40 (a short last block)
    gives the float32 product of every row, as the whole weight widened does."""
    import workers.kernels as kernels

    torch.manual_seed(0)
    weight = torch.randn(40, 48).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "CONVERT_BLOCK_BYTES", 4 * 48 * 7)
    monkeypatch.setattr(kernels, "_scratch", __import__("threading").local())
    for rows in (1, 3, 16):
        x = torch.randn(rows, 48, dtype=torch.bfloat16)
        ref = (x.double() @ weight.double().t()).to(torch.bfloat16)
        got = kernels.matmul(x, weight, "converted")
        assert got.shape == (rows, 40)
        torch.testing.assert_close(got, ref, rtol=0, atol=0.02)
        torch.testing.assert_close(got, kernels.matmul(x, weight.float(), "widened"), rtol=0, atol=0)


def test_both_int8_kernels_compute_the_same_layer():
    from workers.quantize import quantize_linear_int8

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=True).to(torch.bfloat16)
    quantize_linear_int8(layer)
    for rows in (1, 5, 300):
        x = torch.randn(1, rows, 48, dtype=torch.bfloat16)
        a, b = (_linear(x, layer, int8_kernel=k).float() for k in ("int8pack", "dequant"))
        assert a.shape == (1, rows, 40)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)


def test_kernel_choice_takes_the_fastest_per_bucket():
    timings = {1: {"linear": 3.0, "weight_major": 2.0, "linear_pair": 1.0}, 2: {"linear": 1.0, "weight_major": 2.0}}
    assert fastest(timings) == {1: "linear_pair", 2: "linear"}
    choice = KernelChoice(linear=fastest(timings), head={1: "weight_major"}, measured=True)
    assert choice.linear_kernel(1) == "linear_pair" and choice.linear_kernel(2) == "linear"
    assert choice.linear_kernel(1, head=True) == "weight_major"
    assert choice.linear_kernel(10_000) == "linear"        # past the last bucket: the last one's choice
    assert KernelChoice(linear={64: "widened"}).linear_kernel(300) == "widened"
    assert bucket(3, (1, 2, 4)) == 4 and bucket(5, (1, 2, 4)) is None
    derived = KernelChoice.from_timings({"linear": timings, "attention": {1: {"native": 0.2, "float32": 0.1}},
                                         "int8": {1: {"int8pack": 1.0, "dequant": 2.0},
                                                  256: {"int8pack": 9.0, "dequant": 3.0}}})
    assert derived.linear == {1: "linear_pair", 2: "linear"} and derived.attention_fp32
    assert derived.int8_kernel(1) == "int8pack" and derived.int8_kernel(200) == "dequant"
    assert derived.int8_kernel(10_000) == "dequant"        # past the last bucket: the last one's choice
    assert not KernelChoice.from_timings({"attention": {1: {"native": 0.1, "float32": 0.2}}}).attention_fp32


def test_a_bucket_slower_than_a_larger_one_runs_padded_to_it():
    """Where a larger bucket's fastest kernel beats this bucket's by more than the noise margin (the
    EPYC 7003's float32 GEMM: 173 ms at 8 rows, 133 at 16), rows are zero-padded to it; the product of
    the real rows is the same."""
    timings = {4: {"widened": 0.060}, 8: {"widened": 0.173, "converted": 0.199},
               16: {"converted": 0.133, "widened": 0.198}, 32: {"converted": 0.216}}
    assert padded_up(timings, fastest(timings)) == {4: "widened", 8: "converted@16", 16: "converted",
                                                     32: "converted"}
    close = {8: {"widened": 0.140}, 16: {"converted": 0.133}}          # within the margin: not padded
    assert padded_up(close, fastest(close)) == {8: "widened", 16: "converted"}
    choice = KernelChoice.from_timings({"linear": timings})
    assert choice.linear_kernel(5) == "converted@16" and choice.linear_kernel(3) == "widened"
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=True).to(torch.bfloat16)
    for rows in (5, 8, 16):
        x = torch.randn(1, rows, 48, dtype=torch.bfloat16)
        got = _linear(x, layer, "weight_major@16")
        assert got.shape == (1, rows, 40)
        torch.testing.assert_close(got.float(), layer(x).float(), rtol=2e-2, atol=2e-2)


def test_rows_inside_a_bucket_run_padded_where_its_kernel_was_not_faster_there():
    """A GEMM can take longer for a few rows less than its bucket (the EPYC 7003: 26 ms for 15 rows, 16 ms
    for 16): rows from interior_rows(b) up to b run padded to b where the timing at interior_rows(b) was
    not more than 10% below b's own, in the same rounds; elsewhere, and below that row count, unpadded."""
    from workers.kernels import interior_rows, padded_from

    assert [interior_rows(b) for b in (4, 8, 16, 32, 64)] == [3, 6, 12, 24, 48]
    timings = {"linear": {4: {"widened": 1.0}, 8: {"widened": 2.0}, 16: {"converted": 3.0},
                          32: {"converted": 9.0}, 64: {"converted": 5.0}},
               "linear-interior": {4: {"interior": 1.2, "bucket": 1.0}, 8: {"interior": 1.5, "bucket": 2.0},
                                   16: {"interior": 4.0, "bucket": 3.1}, 32: {"interior": 9.5, "bucket": 9.0}}}
    choice = KernelChoice.from_timings(timings)
    assert choice.linear[32] == "converted@64"                       # padded up already: not padded inside
    assert padded_from(timings["linear-interior"], choice.linear) == {4: 3, 16: 12}
    assert padded_from({8: {"interior": 1.85, "bucket": 2.0}}, {8: "widened"}) == {8: 6}    # within the noise
    assert choice.linear_kernel(3) == "widened@4" and choice.linear_kernel(4) == "widened"
    assert [choice.linear_kernel(r) for r in (5, 6, 7)] == ["widened"] * 3          # 6 rows were faster
    assert [choice.linear_kernel(r) for r in (9, 11, 12, 15, 16)] == ["converted"] * 2 + ["converted@16"] * 2 + [
        "converted"]
    assert choice.linear_kernel(20) == "converted@64" and choice.linear_kernel(2, head=True) == "linear"
    layer = torch.nn.Linear(48, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(1, 3, 48, dtype=torch.bfloat16)
    torch.testing.assert_close(_linear(x, layer, choice.linear_kernel(3)).float(), layer(x).float(),
                               rtol=2e-2, atol=2e-2)


def test_float32_copies_are_made_only_where_chosen_and_fit_and_follow_a_sliced_weight(target_model, monkeypatch):
    """`widened` computes on float32 copies: made when a bucket picks it, left out where they would not
    fit in memory (the next fastest kernel instead), and remade for a weight replaced after the runner
    was built (a tensor-parallel rank's slice)."""
    from workers.kernels import widen_

    timings = {"linear": {1: {"linear": 1.0, "widened": 2.0}, 16: {"linear": 3.0, "weight_major": 4.0, "widened": 1.0}}}
    assert KernelChoice.from_timings(timings).linear == {1: "linear", 16: "widened"}
    assert KernelChoice.from_timings(timings, widen=False).linear == {1: "linear", 16: "linear"}
    monkeypatch.setenv("SPECORCH_KERNELS", "default")            # fixed kernels: nothing widened at load
    runner = ModelRunner(copy.deepcopy(target_model).to(torch.bfloat16))
    runner.kernels = KernelChoice(linear={1: "linear", 16: "linear"}, measured=True)
    runner.widen()
    assert all(wide_weight(m) is None for m in dense_linears(runner))
    runner.kernels = KernelChoice(linear={1: "linear", 16: "widened"}, measured=True)
    runner.widen()
    layer = runner.layers[0].mlp.down_proj
    assert wide_weight(layer).dtype == torch.float32 and torch.equal(wide_weight(layer), layer.weight.float())
    layer.weight = torch.nn.Parameter(layer.weight.data[:, :8].clone(), requires_grad=False)
    assert wide_weight(layer) is None                  # made from the old weight: not used
    widen_([layer])
    assert wide_weight(layer).shape == layer.weight.shape


def test_kernels_are_timed_on_weights_streamed_from_memory(target_model):
    """Several layers' weights per timed pass (up to STREAM_BYTES, at most 8 layers; a stage's few layers
    cycled), not one weight again and again: a float32 weight timed on its own ran twice as fast as in
    a forward."""
    runner = ModelRunner(copy.deepcopy(target_model).to(torch.bfloat16))
    timed = timed_linears(runner)
    assert len(timed) == 4 * 8 and len({id(m) for m in timed}) == 4 * len(runner.layers)
    stage = ModelRunner(copy.deepcopy(target_model).to(torch.bfloat16), layer_range=(0, 1))
    assert [m.weight.shape for m in timed_linears(stage)] == [m.weight.shape for m in timed]


def test_a_burst_of_other_work_slows_every_candidate_not_one(monkeypatch):
    """Candidates are timed in rounds: a burst of other work (another actor loading on the same cores)
    that spans three calls must not hide the fastest candidate. Timed one candidate after the other
    (warm-up, then its reps), the burst fell on all of the fast one's timed calls and the slow one won."""
    now, calls = [0.0], [0]

    def kernel(cost):
        def run():
            burst = 0.030 if 1 <= calls[0] <= 3 else 0.0
            calls[0] += 1
            now[0] += cost + burst
        return run
    import types
    import workers.kernels as kernels
    monkeypatch.setattr(kernels, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    costs = {"fast": 0.002, "slow": 0.006}
    timings = kernels.time_candidates([1], [(4, None)], lambda rows: list(costs),
                                      lambda x, op, k: kernel(costs[k])(), torch.float32, "cpu")
    assert timings == {1: pytest.approx(costs)}
    # The rule it replaced: candidate by candidate; the same burst makes "slow" look faster.
    now[0], calls[0] = 0.0, 0
    one_by_one = {name: best_seconds_interleaved({name: fn}, reps=3, clock=lambda: now[0])[name]
                  for name, fn in (("fast", kernel(0.002)), ("slow", kernel(0.006)))}
    assert one_by_one["slow"] < one_by_one["fast"]
    # A candidate whose warm-up is long is timed once; the others still get their rounds.
    now[0], calls[0] = 0.0, 10
    runs = {"long": 0, "short": 0}

    def counted(name, cost):
        def run():
            runs[name] += 1
            now[0] += cost
        return run
    best_seconds_interleaved({"long": counted("long", 0.2), "short": counted("short", 0.001)}, reps=3,
                             clock=lambda: now[0])
    assert runs == {"long": 2, "short": 4}


def test_float32_keeps_hf_kernels_and_reduced_precision_is_measured(target_model):
    assert not ModelRunner(target_model).kernels.measured          # float32: HF's own kernels, exact
    bf16 = copy.deepcopy(target_model).to(torch.bfloat16)
    runner = ModelRunner(bf16)
    assert runner.kernels.measured
    assert set(runner.kernels.linear) == set(ROW_BUCKETS) and set(runner.kernels.head) == set(ROW_BUCKETS)
    timed = runner.kernels.timings["linear"]
    assert runner.kernels.linear == padded_up(timed, fastest(timed))     # fastest, or a faster bucket's padded
    for rows, kernel in runner.kernels.linear.items():
        if "@" not in kernel:
            assert kernel == min(timed[rows], key=timed[rows].get)
    att = runner.kernels.timings["attention"][1]
    assert runner.kernels.attention_fp32 == (att["float32"] < att["native"])


@pytest.mark.parametrize("kernel", LINEAR_KERNELS)
@pytest.mark.parametrize("upcast", [False, True])
def test_bf16_forward_many_with_each_kernel_is_close_to_float32(target_model, prompts, kernel, upcast):
    """Every kernel a machine may pick computes the same model (to bf16 rounding), packed or alone."""
    ref_runner = ModelRunner(target_model)
    runner = ModelRunner(copy.deepcopy(target_model).to(torch.bfloat16))
    runner.kernels = KernelChoice(linear={b: kernel for b in ROW_BUCKETS}, head={b: kernel for b in ROW_BUCKETS},
                                  attention_fp32=upcast, measured=True)
    runner.widen()
    if kernel == "widened":                    # every layer and the head computes on its float32 copy
        assert all(wide_weight(m) is not None for m in dense_linears(runner) + [runner.lm_head])
    reqs, refs = [], []
    for p in prompts[:3]:
        c, rc = runner.new_cache(1, 64), ref_runner.new_cache(1, 64)
        runner.prefill(c, 0, p[:-2])
        ref_runner.prefill(rc, 0, p[:-2])
        reqs.append((c, torch.tensor([p[-2:]]), None, None, None))
        refs.append(ref_runner.forward(rc, torch.tensor([p[-2:]])))
    for got, ref in zip(runner.forward_many(reqs), refs):
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    try:
        ModelRunner(model)
    except ValueError as e:
        assert "gpt2" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_kernel_choice_is_measured_once_per_machine_and_shapes(target_model, tmp_path, monkeypatch):
    """Every process of a deployment reads back the first measurement (bf16 results must not depend on
    one start-up's timing noise); a pipeline stage without the output head shares the layers' choice."""
    import workers.kernels as kernels

    monkeypatch.setenv("SPECORCH_CACHE", str(tmp_path))
    picks = iter(["linear", "weight_major", "linear_pair", "linear"])

    def fake_timing(buckets, operands, candidates, run, *a, **kw):     # each call: another kernel "wins"
        kind = next(picks)
        return {b: {k: 0.0 if k == kind else 1.0 for k in LINEAR_KERNELS} for b in ROW_BUCKETS}
    monkeypatch.setattr(kernels, "time_candidates", fake_timing)
    bf16 = copy.deepcopy(target_model).to(torch.bfloat16)
    first, again = ModelRunner(bf16).kernels, ModelRunner(bf16).kernels
    assert first.linear == again.linear and first.head == again.head
    assert (first.linear[1], first.head[1]) == ("linear", "weight_major")
    stage = ModelRunner(bf16, layer_range=(0, 1)).kernels            # no head: the same layer choice
    assert stage.linear == first.linear and not stage.head
    monkeypatch.setenv("SPECORCH_KERNELS", "remeasure")
    assert ModelRunner(bf16).kernels.linear[1] == "linear_pair"


def test_an_unwritable_kernel_cache_still_measures(target_model, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPECORCH_CACHE", str(blocker / "cache"))       # under a file: cannot be made
    runner = ModelRunner(copy.deepcopy(target_model).to(torch.bfloat16))
    assert runner.kernels.measured and runner.kernels.linear


@pytest.fixture(scope="module")
def gemma3():
    from tests.conftest import tiny_model
    return tiny_model("gemma3", seed=0, layers=3)


def test_gemma3_matches_hf_across_its_sliding_window(gemma3, prompts):
    """Gemma 3 (a drafter with a third tokenizer, docs/cross_vocab.md): prefill, chain, one-token steps,
    a tree and a packed batch equal HF's forward in float32, the prompts crossing the sliding window
    (4 tokens here). Broken versions fail: without the window mask, the post-attention and post-MLP
    norms, or the sliding layers' own rotary embedding."""
    runner = ModelRunner(gemma3)
    assert runner._sliding == [True, True, False] and runner.sandwich_norms
    ids = prompts[1]                                             # 25 tokens
    ref = hf_logits(gemma3, ids)
    cache = runner.new_cache(1, capacity=8)
    got = [runner.forward(cache, torch.tensor([ids[:10]]))[0], runner.forward(cache, torch.tensor([ids[10:20]]))[0]]
    got += [runner.forward(cache, torch.tensor([[t]]))[0] for t in ids[20:]]
    torch.testing.assert_close(torch.cat(got), ref, rtol=1e-5, atol=1e-5)
    # a tree over a prefix: each node's logits are those of its root-to-node chain
    prefix, root, tokens, parents = ids[:12], ids[12], [40, ids[13], 41], [-1, -1, 1]
    cache = runner.new_cache(1, 64)
    runner.forward(cache, torch.tensor([prefix]))
    mask, depths = tree_attention(parents, "cpu")
    tree = runner.forward(cache, torch.tensor([[root] + tokens]), depths=depths[None], tree_mask=mask[None])[0]
    for node, chain in ((0, [40]), (1, [ids[13]]), (2, [ids[13], 41])):
        torch.testing.assert_close(tree[node + 1], hf_logits(gemma3, prefix + [root] + chain)[-1], rtol=1e-5,
                                   atol=1e-5)
    # a packed batch of two sequences, each after its own prefix
    caches = [runner.new_cache(1, 64), runner.new_cache(1, 64)]
    for c, p in zip(caches, prompts[1:]):
        runner.forward(c, torch.tensor([p[:-3]]))
    outs = runner.forward_many([(c, torch.tensor([p[-3:]]), None, None, None) for c, p in zip(caches, prompts[1:])])
    for out, p in zip(outs, prompts[1:]):
        torch.testing.assert_close(out[0], hf_logits(gemma3, p)[-3:], rtol=1e-5, atol=1e-5)


def test_gemma3_drafting_for_gemma3_equals_plain_decoding(gemma3, prompts):
    from core.draft_length import FixedDraftLength
    from orchestrator.engine import SpeculativeEngine
    from tests.conftest import tiny_model
    from tests.drafting import assert_drafted
    from workers.drafters import DraftModelDrafter

    target = ModelRunner(gemma3)
    drafter = DraftModelDrafter(ModelRunner(tiny_model("gemma3", seed=1, layers=2)))
    for p in prompts:
        plain = SpeculativeEngine(target).generate(p, 24).tokens
        run = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(4)).generate(p, 24)
        assert run.tokens == plain
    assert_drafted([run])
