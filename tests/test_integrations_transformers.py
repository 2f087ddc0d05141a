"""mtp.integrations.transformers against real transformers: a tiny random
DeepseekV4ForCausalLM (tests/hf_v4.py), its cache, its generate, and the traps of driving the
drafter from it by hand."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers", reason="transformers is in the test extra: "
                    "pip install -e '.[test]'")

from doc_blocks import python_blocks, run_python_blocks  # noqa: E402
from hf_v4 import build_target, write_matching_drafter  # noqa: E402
from transformers import DeepseekV4ForCausalLM, DynamicCache  # noqa: E402

from mtp import CheckpointError, Drafter, Sampling  # noqa: E402
from mtp.integrations.transformers import TransformersTarget, check_residuals  # noqa: E402

LAYERS = ("sliding", "compressed")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to gain from threads, and with other processes
    on the cores OpenMP's waiting makes each forward ~10x slower (measured: 20 ms vs 200 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def targets():
    return {layers: build_target(layers) for layers in LAYERS}


@pytest.fixture(scope="module")
def drafter_folders(targets, tmp_path_factory):
    return {layers: write_matching_drafter(model, tmp_path_factory.mktemp(layers))
            for layers, model in targets.items()}


@torch.no_grad()
def full_rows(model, tokens: list[int]):
    """An independent reference: the whole sequence in one forward without a cache; logits
    [n, V] float32 and the input of hc_head [n, M*D] (read by a hook of this test's own)."""
    seen = []
    hook = model.model.hc_head.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        out = model(torch.tensor([tokens]), use_cache=False)
    finally:
        hook.remove()
    return out.logits[0].float(), seen[0][0].flatten(1)


def cache_kw(cache) -> dict:
    """transformers renamed forward's past_key_values= to cache= (5.2x)."""
    params = inspect.signature(DeepseekV4ForCausalLM.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# float32: a chunked forward with a cache vs the whole sequence at once differs by summation
# order only (~1e-7 relative); a wrong cache state (a window off by one token, a stale
# compressor entry) moves the rows by 1e-3 or more.
F32_TOL = 1e-5


# ---- the target protocol --------------------------------------------------------------------
steps = st.lists(st.tuples(st.integers(1, 5), st.lists(st.floats(0, 1), min_size=3,
                                                        max_size=3)), min_size=1, max_size=5)


@settings(max_examples=25)
@given(layers=st.sampled_from(LAYERS),
       prompt_lens=st.lists(st.integers(1, 20), min_size=1, max_size=3), steps=steps,
       seed=st.integers(0, 2**16))
def test_rows_equal_a_fresh_forward_through_extends_and_rollbacks(targets, layers, prompt_lens,
                                                                   steps, seed):
    """Per sequence, every row the target returned for the tokens it kept equals the row of
    one fresh forward over the final sequence, whatever each sequence kept at each rollback
    (sequences keep different numbers of tokens; prompts up to 20 tokens cross the window of 8
    and close compressor windows of 4 and 8)."""
    model = targets[layers]
    gen = torch.Generator().manual_seed(seed)
    v = model.config.vocab_size

    def tokens(n):
        return torch.randint(0, v, (n,), generator=gen).tolist()

    target = TransformersTarget(model)
    seqs = [tokens(n) for n in prompt_lens]
    rows = [[out.logits[0], out.residuals[0]] for out in target.prefill(seqs)]  # per sequence
    for t, keep in steps:
        new = [tokens(t) for _ in seqs]
        out = target.extend(torch.tensor(new))
        lengths = [len(s) + round(f * t) for s, f in zip(seqs, keep)]
        target.rollback(lengths)
        assert target.lengths == lengths
        for b, n in enumerate(lengths):
            kept = n - len(seqs[b])
            seqs[b] += new[b][:kept]
            rows[b] = [torch.cat([r, o[b, :kept]]) for r, o in zip(rows[b],
                                                                   (out.logits, out.residuals))]
    for seq, (logits, residuals) in zip(seqs, rows):
        want_logits, want_residuals = full_rows(model, seq)
        assert rel_err(logits, want_logits) < F32_TOL
        assert rel_err(residuals, want_residuals) < F32_TOL


def test_rollback_restores_the_exact_cache_state(targets):
    """Rejecting every token of an extend puts every cache layer back bit for bit (sliding
    layers by crop, compressed ones from the kept state), compressor and indexer buffers,
    emitted entries, overlap state and counters included."""
    for layers in LAYERS:
        target = TransformersTarget(targets[layers])
        target.prefill([list(range(30, 49))])
        seq = target._seqs[0]
        target._settle(seq)  # sliding layers back to their window, as every extend starts
        before = _cache_state(seq.cache)
        target.extend(torch.tensor([[1, 2, 3, 4, 5]]))
        assert _cache_state(seq.cache) != before
        target.rollback([19])
        target._settle(seq)
        assert _cache_state(seq.cache) == before


def _cache_state(cache) -> list:
    """Every attribute of every cache layer, tensors as exact (dtype, shape, values) tuples."""
    def freeze(v):
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), tuple(v.shape), tuple(v.flatten().tolist()))
        if isinstance(v, dict):
            return tuple(sorted((k, freeze(x)) for k, x in v.items()))
        return repr(v)
    return [freeze(vars(layer)) for layer in cache.layers]


@pytest.mark.parametrize("layers", LAYERS)
def test_rollback_refuses_lengths_it_cannot_reach_and_changes_nothing(targets, layers):
    target = TransformersTarget(targets[layers])
    target.prefill([[1, 2, 3, 4, 5], [6, 7]])
    target.extend(torch.tensor([[8, 9, 10], [11, 12, 13]]))
    for bad, match in (([9, 5], "outside"), ([4, 5], "outside"), ([8], "2 sequences"),
                       ([8.0, 5], "outside")):
        with pytest.raises(ValueError, match=match):
            target.rollback(bad)
        assert target.lengths == [8, 5]
    target.rollback([6, 5])
    if layers == "compressed":  # the state before the extend is kept: going further is fine
        target.rollback([5, 5])
        assert target.lengths == [5, 5]
    else:  # a cropped window cannot grow back
        with pytest.raises(ValueError, match=r"lengths\[0\]: 5 is outside \[6, 6\]"):
            target.rollback([5, 5])
        assert target.lengths == [6, 5]


def test_protocol_input_errors_are_clear(targets):
    target = TransformersTarget(targets["sliding"])
    with pytest.raises(RuntimeError, match="prefill first"):
        target.extend(torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"prompts\[1\]: token 5000"):
        target.prefill([[1, 2], [5000]])
    target.prefill([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"\[B, T\] = \[2, T >= 1\]"):
        target.extend(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        target.extend(torch.ones(2, 1))
    assert target.lengths == [2, 1]
    with pytest.raises(TypeError, match="DeepseekV4ForCausalLM"):
        TransformersTarget(torch.nn.Linear(2, 2))


# ---- the traps --------------------------------------------------------------------------------
def test_hidden_states_minus_2_is_caught(targets):
    """output_hidden_states: [-1] is the normalised final output [B, T, D], [-2] the previous
    block's output (the right shape, the wrong tensor). check_residuals tells them apart from
    the true residual (the input of hc_head)."""
    model = targets["compressed"]
    ids = list(range(40, 52))
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    logits, residuals = full_rows(model, ids)
    check_residuals(model, residuals, logits)  # the true residual passes
    check_residuals(model, residuals.view(len(ids), 4, -1)[None], out.logits)  # [1, T, M, D]
    minus2 = out.hidden_states[-2]
    assert minus2.shape == (1, len(ids), 4, model.config.hidden_size)  # same shape...
    with pytest.raises(ValueError, match=r"not the pre-hc_head residuals.*hidden_states\[-2\]"):
        check_residuals(model, minus2.flatten(2), out.logits)  # ...but caught
    with pytest.raises(ValueError, match="normalised final output"):
        check_residuals(model, out.hidden_states[-1], out.logits)


def test_the_adapter_reads_the_last_blocks_output_or_says_why_not(targets):
    """If anything came between the last decoder block and hc_head (here a user's hook that
    replaces the tensor), the adapter refuses rather than read something else."""
    model = targets["sliding"]
    target = TransformersTarget(model)
    hook = model.model.hc_head.register_forward_pre_hook(lambda _m, a: (a[0] * 1.0,))
    try:
        with pytest.raises(RuntimeError, match="last decoder block's output"):
            target.prefill([[1, 2, 3]])
    finally:
        hook.remove()
    target.prefill([[1, 2, 3]])


def test_naive_cache_crop_is_wrong_on_compressed_layers_and_the_adapter_is_not(targets):
    """transformers' own crop: refused for sliding-window layers past the window unless past
    recording is on; with it on, it runs on CSA/HCA layers too but leaves their compressor state
    behind, and the next forward fails or is wrong. The adapter restores them instead."""
    prompt, drafts, after = list(range(100, 118)), [7, 8, 9], [11, 12]
    with torch.no_grad():
        sliding = targets["sliding"]
        cache = DynamicCache(config=sliding.config)
        sliding(torch.tensor([prompt]), use_cache=True, **cache_kw(cache))
        sliding(torch.tensor([drafts]), use_cache=True, **cache_kw(cache))
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            cache.crop(-3)

        model = targets["compressed"]
        cache = DynamicCache(config=model.config)
        cache.activate_past_recording()
        model(torch.tensor([prompt]), use_cache=True, **cache_kw(cache))
        model(torch.tensor([drafts]), use_cache=True, **cache_kw(cache))
        try:
            cache.crop(-3)  # all three drafts rejected
            naive = model(torch.tensor([after]), use_cache=True, **cache_kw(cache)).logits[0]
        except (RuntimeError, TypeError):  # 5.25: the compressed entries no longer fit the
            naive = None  # mask; 5.20: the crop itself fails on the compressed layers
    fresh, _ = full_rows(model, prompt + after)
    assert naive is None or rel_err(naive, fresh[-2:]) > 1e-2  # a crash, or silently wrong

    target = TransformersTarget(model)
    target.prefill([prompt])
    target.extend(torch.tensor([drafts]))
    target.rollback([len(prompt)])
    assert rel_err(target.extend(torch.tensor([after])).logits[0], fresh[-2:]) < F32_TOL


def test_save_pretrained_folder_says_to_load_the_release_folder(targets, tmp_path):
    model = targets["sliding"]
    model.save_pretrained(tmp_path)
    target = TransformersTarget(model)
    with pytest.raises(CheckpointError, match="save_pretrained folder.*release folder"):
        target.load_drafter(tmp_path)
    with pytest.raises(CheckpointError, match="save_pretrained folder.*release folder"):
        Drafter.from_pretrained(tmp_path)


def test_drafter_shares_the_targets_embedding_and_head(targets, drafter_folders):
    model = targets["sliding"]
    drafter = TransformersTarget(model).load_drafter(drafter_folders["sliding"])
    assert drafter.model.model.embed_tokens.weight.data_ptr() == \
        model.model.embed_tokens.weight.data_ptr()
    assert drafter.model.layer(0).shared_head.head.weight.data_ptr() == \
        model.lm_head.weight.data_ptr()
    assert drafter.load_report is not None and drafter.model.dtype == torch.float32


def test_init_random_refuses_the_targets_shared_embedding_and_head(targets, drafter_folders):
    """A drafter built with the target's tables: random init must not write into the target
    (before: init_random_ filled the shared embedding and head with random values)."""
    from mtp.testing import init_random_

    model = targets["sliding"]
    drafter = TransformersTarget(model).load_drafter(drafter_folders["sliding"])
    assert drafter.model.shared_with_caller == {"embed_tokens", "head"}
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    norm = drafter.model.layer(0).enorm.weight.clone()
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight is the caller's tensor"
                                         r".*skip_shared=True"):
        init_random_(drafter.model, seed=3)
    assert torch.equal(drafter.model.layer(0).enorm.weight, norm)  # refused before any write
    init_random_(drafter.model, seed=3, skip_shared=True)
    assert not torch.equal(drafter.model.layer(0).enorm.weight, norm)  # its own ones filled
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the target's left alone
    assert torch.equal(model.lm_head.weight, head)


def test_casting_the_target_after_building_the_drafter_is_caught(drafter_folders):
    model = build_target("sliding")
    target = TransformersTarget(model)
    drafter = target.load_drafter(drafter_folders["sliding"])
    target.prefill([[1, 2, 3]])
    model.to(torch.bfloat16)  # the drafter keeps the old float32 embedding and head
    with pytest.raises(RuntimeError, match=r"cast or moved.*load_drafter"):
        target.prefill([[4, 5]])
    assert target.lengths == [3]  # refused before any state changed
    with pytest.raises(RuntimeError, match="cast or moved"):
        target.generate(drafter, [[4, 5]], 4)
    fresh = target.load_drafter(drafter_folders["sliding"])  # the fix the error names
    del drafter
    assert fresh.model.dtype == torch.bfloat16
    target.prefill([[4, 5]])


def test_a_drafter_of_another_shape_or_not_sharing_is_refused(targets, drafter_folders):
    target = TransformersTarget(targets["sliding"])
    unshared = Drafter.from_pretrained(drafter_folders["sliding"], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="without embed_tokens=/head="):
        target.check_drafter(unshared)


# ---- speculative decoding through the adapter ---------------------------------------------------
PROMPTS = [[5, 9, 100, 7], list(range(20, 31)), list(range(300, 321))]  # 4, 11, 21 tokens: both
N_NEW = 16  # sides of the window (8) and of the compressor windows (4, 8)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding, one prompt at a time (no padding involved)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layers", LAYERS)
def test_greedy_speculative_tokens_equal_transformers_generate(layers, dtype, drafter_folders):
    """Several prompts at once, k = 1..4: exactly transformers' greedy tokens, with drafts
    partly accepted (so rollbacks of different lengths per sequence happened)."""
    model = build_target(layers).to(dtype)
    want = [greedy_reference(model, p, N_NEW) for p in PROMPTS]
    target = TransformersTarget(model)
    drafter = target.load_drafter(drafter_folders[layers], max_seqs=len(PROMPTS),
                                  max_draft_tokens=4)
    assert drafter.model.dtype == dtype
    for k in (1, 2, 3, 4):
        tokens, stats = target.generate(drafter, PROMPTS, N_NEW, k=k)
        assert tokens == want, f"k={k}"
        assert 0 < stats.acceptance_per_position[0] < 1, f"k={k}: {stats}"


def test_drafts_equal_those_of_a_fresh_drafter_fed_all_real_rows(targets, drafter_folders):
    """Each proposal made during a run (catch-up rows fed a few at a time, draft entries rolled
    back) equals that of a fresh drafter fed the sequence's real rows at once, read from a fresh
    prefill of the tokens so far."""
    model = targets["compressed"]
    target = TransformersTarget(model)
    drafter = target.load_drafter(drafter_folders["compressed"], max_seqs=3)
    log = []
    propose = drafter.propose

    def spy(seq_ids, *args, **kwargs):
        p = propose(seq_ids, *args, **kwargs)
        log.append([(s, drafter.next_position(s), d) for s, d in zip(seq_ids, p.drafts.tolist())])
        return p

    drafter.propose = spy
    tokens, _ = target.generate(drafter, PROMPTS, N_NEW, k=3)
    checked = 0
    for call in log:
        for b, (s, n, drafts) in enumerate(call):
            seq = PROMPTS[b] + tokens[b]
            fresh_target = TransformersTarget(model)
            rows = fresh_target.prefill([seq[:n]])[0].residuals[0]  # positions 0 .. n-1
            fresh = target.load_drafter(drafter_folders["compressed"], max_seqs=1)
            fresh.add_sequence("s")
            p = fresh.propose(["s"], rows, torch.tensor(seq[1:n + 1]), torch.arange(n), [n],
                              k=len(drafts))  # row j's next token: seq[j + 1]
            assert p.drafts[0].tolist() == drafts, (s, n)
            checked += 1
    assert checked >= 3 * 3


def test_sampled_tokens_follow_the_targets_distribution(targets, drafter_folders):
    """N copies of one prompt decoded at once, temperature 1: the first token is the prefill's
    sample, the second comes out of the first verification (draft accepted with probability
    min(1, p/q), else resampled from the residual). The pairs must follow p(t1) p(t2 | t1), the
    target's own distribution. Power: the same sample rejects p(t1) p(t2) (the second token
    scored on the prompt's row, an off-by-one in the rows) with a p-value below 1e-20."""
    from test_verify import P_MIN, chi_square_p_value

    model = targets["compressed"]
    target = TransformersTarget(model)
    n, prompt = 200, [17, 4, 250, 31, 8, 99]
    drafter = target.load_drafter(drafter_folders["compressed"], max_seqs=n, max_draft_tokens=2)
    gen = torch.Generator().manual_seed(0)
    tokens, stats = target.generate(drafter, [prompt] * n, 2, k=2,
                                    sampling=Sampling(temperature=1.0, generator=gen))
    assert 0 < stats.acceptance_per_position[0] < 1  # both branches of the verifier ran
    pairs = [tuple(t) for t in tokens]

    def dist(logits):
        return torch.softmax(logits.double(), -1)

    p1 = dist(full_rows(model, prompt)[0][-1])
    firsts = [t for t in range(p1.shape[0]) if n * p1[t] >= 5]
    after = {t1: dist(full_rows(model, prompt + [t1])[0][-1]) for t1 in firsts}

    def p_value(cond) -> float:
        """Chi-square over the pairs expected >= 5 times, the rest pooled in one bin."""
        cells = [(t1, t2) for t1 in firsts for t2 in range(p1.shape[0])
                 if n * p1[t1] * cond[t1][t2] >= 5]
        expected = torch.tensor([float(p1[a] * cond[a][b]) for a, b in cells] + [0.0],
                                dtype=torch.float64)
        expected[-1] = 1 - expected[:-1].sum()
        index = {c: i for i, c in enumerate(cells)}
        observed = torch.tensor([index.get(pair, len(cells)) for pair in pairs])
        return chi_square_p_value(observed, expected)

    assert p_value(after) > P_MIN
    assert p_value(dict.fromkeys(firsts, p1)) < 1e-20


def test_the_engines_page_example_runs():
    """docs/engines.md's python blocks, in order, in one namespace (its own assert checks the
    tokens against transformers' generate)."""
    import pathlib
    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "engines.md"
    blocks = python_blocks(page.read_text())
    assert len(blocks) == 1, "the transformers example: the page lost or gained a block"
    namespace, printed = run_python_blocks(page, blocks)
    assert printed.startswith("SpecStats(k=3")
    assert len(namespace["tokens"]) == 3 and all(len(t) == 12 for t in namespace["tokens"])


def test_next_tokens_are_shifted_by_the_loop_and_named_by_the_drafter(targets, drafter_folders):
    """The drafter's row i takes the token at positions[i] + 1. transformers' input_ids are the
    tokens at positions[i]: passed unshifted they are valid ids, nothing raises, and the drafts
    stop agreeing with the target. The speculative loop builds the shifted ids itself (the
    adapter's greedy acceptance above), and the drafter names the argument for what it is
    (next_token_ids=, input_ids= kept as vLLM's name; exactly one of the two)."""
    model = targets["sliding"]
    seq = list(range(60, 90))
    logits, rows = full_rows(model, seq)
    greedy = logits.argmax(-1)  # the target's own next token after each position

    def agreement(next_ids):
        """Fraction of positions whose first draft (for position n + 1) is the target's."""
        hits = 0
        for n in range(10, 29):  # 19 positions
            d = TransformersTarget(model).load_drafter(drafter_folders["sliding"], max_seqs=1)
            d.add_sequence(0)
            p = d.propose([0], rows[:n], next_token_ids=next_ids[:n], positions=torch.arange(n),
                          num_rows_per_seq=[n], k=1)
            hits += int(p.drafts[0, 0]) == int(greedy[n])
        return hits / 19

    ids = torch.tensor(seq)
    shifted = torch.cat([ids[1:], greedy[-1:]])  # the token after each row
    assert agreement(shifted) > 0.3 > 0.05 >= agreement(ids)  # unshifted: silently useless

    d = TransformersTarget(model).load_drafter(drafter_folders["sliding"], max_seqs=2)
    d.add_sequence("a")
    d.add_sequence("b")
    by_name = d.propose(["a"], rows[:9], next_token_ids=shifted[:9], positions=torch.arange(9),
                        num_rows_per_seq=[9], k=2)
    vllm_style = d.propose(["b"], rows[:9], shifted[:9], torch.arange(9), [9], k=2)
    assert torch.equal(by_name.drafts, vllm_style.drafts)
    for kwargs in ({"input_ids": shifted[9:10], "next_token_ids": shifted[9:10]}, {}):
        with pytest.raises(TypeError, match="next_token_ids.*exactly one"):
            d.propose(["a"], rows[9:10], positions=torch.tensor([9]), num_rows_per_seq=[1],
                      k=1, **kwargs)
    assert d.next_position("a") == 9  # refused before any state changed


def test_transformers_residual_layout_is_accepted(targets, drafter_folders):
    """transformers holds the residual as [T, M, D]; the drafter takes it as it is, with the
    same drafts as the flattened [T, M*D]."""
    model = targets["compressed"]
    seq = list(range(200, 215))
    _, rows = full_rows(model, seq)  # [T, M*D]
    streams = rows.view(len(seq), model.config.hc_mult, model.config.hidden_size)  # [T, M, D]
    d = TransformersTarget(model).load_drafter(drafter_folders["compressed"], max_seqs=2)
    out = []
    for seq_id, h in (("flat", rows), ("streams", streams)):
        d.add_sequence(seq_id)
        out.append(d.propose([seq_id], h[:-1], next_token_ids=torch.tensor(seq[1:]),
                             positions=torch.arange(len(seq) - 1),
                             num_rows_per_seq=[len(seq) - 1], k=3))
    assert torch.equal(out[0].drafts, out[1].drafts)
    assert torch.equal(out[0].hidden, out[1].hidden)
