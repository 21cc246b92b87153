"""Many streams in one batched decode step, stop strings, and the compiled sampler's selection.

- The batched loop (cython `generate_batch`) gives every stream the logits it gets alone (the batch
  of one row), bit for bit, at every position, across window refills (learned positions) and slides
  (rope), on every instruction-set path: each row's values never depend on the other rows. Both
  with fused stages (an even head count: attention + out product, and the MLP's two products, each
  one stage with the second product summed over two fixed parts of K) and without (three heads).
- Stream i's text with seed s is the same alone as among 63 other streams.
- Stop strings: at the start, across a window refill, never produced; the API and the CLI.
- fc_token_probs (top-k by selection, top-p by partial extraction, no sort) equals the sorted
  reference (sampler.token_probs) on ties, equal probabilities and edge values of p.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastchar import CharTokenizer, ConfigError, Model, ModelConfig, generate, sampler, set_threads, stream
from fastchar.graph import decode_table
from fastchar.sampler import (
    StopScan,
    batch_loop,
    batch_tokens,
    compiled_tokens,
    decode_state,
    stream_rngs,
    token_probs,
)

cydecode = pytest.importorskip("fastchar._cydecode", reason="the Cython extension is part of the product: build it")

TOK = CharTokenizer("abcdefghij\n")


# (d_model, n_head, mlp_hidden): three heads run 4 stages a layer; two heads of 16 fuse them into 2
SHAPES = {"unfused": (24, 3, 48), "fused": (32, 2, 64)}


def make_model(
    position: str, ctx: int = 8, backend: str = "cython", precision: str = "fp32", shape: str = "unfused"
) -> Model:
    C, H, hidden = SHAPES[shape]
    cfg = ModelConfig(vocab_size=11, d_model=C, n_layer=2, n_head=H, ctx=ctx, mlp_hidden=hidden, position=position)
    m = Model(cfg, backend=backend, seed=4, precision=precision)
    m.params.flat[:] += np.random.default_rng(0).normal(0, 0.3, m.params.flat.size).astype(np.float32)
    return m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_batched_logits_equal_64_single_stream_decodes(isa_path, position, shape):
    """On every instruction-set path (isa_path), bit for bit."""
    model = make_model(position, shape=shape)
    B, N = 64, 40  # 40 > 4 windows of 8: several refills (learned) or slides (rope)
    r = np.random.default_rng(5)
    prompts = [[int(t) for t in r.integers(0, 11, 1 + b % 8)] for b in range(B)]
    batched = np.zeros((B, N, 11), np.float32)
    toks = np.concatenate(
        list(batch_tokens(model, prompts, N, 1.0, None, None, stream_rngs(3, B), 8, chunk=9, logits=batched)), axis=1
    )
    for b in range(B):
        single = np.zeros((N, 11), np.float32)
        rng = stream_rngs(3, B)[b]
        alone = np.concatenate(list(compiled_tokens(model, prompts[b], N, 1.0, None, None, rng, 8, logits=single)))
        np.testing.assert_array_equal(batched[b], single, err_msg=f"stream {b}")  # bit for bit
        np.testing.assert_array_equal(toks[b], alone, err_msg=f"stream {b}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("threads, shape", [(1, "unfused"), (2, "unfused"), (2, "fused")])
@pytest.mark.parametrize("streams_per_group", [1, 5])
def test_cache_groups_change_no_token_and_no_logit(monkeypatch, streams_per_group, threads, shape, precision):
    """generate_batch runs the streams group after group (one thread) or groups side by side (two):
    the tokens and logits are those of one big group; stopped streams stay out."""
    if precision == "bf16" and not cydecode.packed_available("bf16"):
        pytest.skip("no AVX512_BF16: bf16 models decode in fp32")
    model = make_model("rope", precision=precision, shape=shape)
    B, N = 12, 30
    prompts = [[b % 11, (5 * b) % 11] for b in range(B)]
    whole = np.zeros((B, N, 11), np.float32)
    rngs = stream_rngs(4, B)
    toks = np.concatenate(list(batch_tokens(model, prompts, N, 1.0, None, 0.9, rngs, 8, 7, logits=whole)), 1)
    st = decode_state(model, B, 8)
    per_stream = st.kcache[0].nbytes + st.vcache[0].nbytes
    monkeypatch.setattr(sampler, "CACHE_GROUP_BYTES", streams_per_group * per_stream + per_stream // 2)
    assert sampler.cache_groups(st).tolist() == [0] * B  # no stream running
    st.active[:] = 1
    st.active[3] = 0
    n_groups = -(-(B - 1) // streams_per_group)
    running = [b for b in range(B) if b != 3]
    expect = {b: i * n_groups // (B - 1) for i, b in enumerate(running)}
    assert sampler.cache_groups(st).tolist() == [expect.get(b, 0) for b in range(B)]
    sizes = np.bincount(list(expect.values()))
    assert len(sizes) == n_groups and sizes.max() - sizes.min() <= 1 and sizes.max() <= streams_per_group
    set_threads(threads)
    try:
        grouped = np.zeros((B, N, 11), np.float32)
        active = np.ones(B, np.int32)
        chunks = []
        for out in batch_tokens(model, prompts, N, 1.0, None, 0.9, stream_rngs(4, B), 8, 7, active, grouped):
            chunks.append(out)
            active[2] = 0  # stopped after its first chunk: its later rows stay zero, the others go on
    finally:
        set_threads()
    got = np.concatenate(chunks, 1)
    np.testing.assert_array_equal(np.delete(got, 2, 0), np.delete(toks, 2, 0))
    np.testing.assert_array_equal(np.delete(grouped, 2, 0), np.delete(whole, 2, 0))  # bit for bit
    np.testing.assert_array_equal(got[2, :7], toks[2, :7])
    assert not got[2, 7:].any() and active.tolist() == [1, 1, 0] + [1] * (B - 3)
    bad = decode_state(model, 2, 8)
    bad.start(0, [1], 1.0, None, None)
    with pytest.raises(ValueError, match="group"):
        cydecode.generate_batch(bad, np.zeros((2, 3), np.int32), np.zeros((2, 3)), True,
                                np.zeros((2, 0, 11), np.float32), np.array([5, 0], np.int32))  # fmt: skip


def test_cache_groups_are_whole_tiles_of_the_product(isa_path, monkeypatch):
    """A group of 8 on avx2 (tile 6) would run 4 + 4 rows: groups are whole tiles, the rest last."""
    model = make_model("rope")
    st = decode_state(model, 30, 8)
    assert st.tile_rows == cydecode.tile_rows() == {"avx512": 8, "avx2": 6, "neon": 4, "generic": 1}[isa_path]
    per_stream = st.kcache[0].nbytes + st.vcache[0].nbytes
    monkeypatch.setattr(sampler, "CACHE_GROUP_BYTES", 9 * per_stream)
    st.active[:] = 1
    sizes = np.bincount(sampler.cache_groups(st)).tolist()
    if st.tile_rows > 1:
        tile = 9 - 9 % st.tile_rows
        assert sizes == [tile] * (30 // tile) + ([30 % tile] if 30 % tile else [])
    else:
        assert sorted(sizes) == [7, 7, 8, 8]  # about equal


def test_one_stream_is_the_batch_of_one_row_and_the_state_is_checked():
    model = make_model("rope")
    assert model.kernels.generate_tokens is model.kernels.generate_batch  # one driver
    st = decode_state(model, 2, 8)
    st.start(0, [1, 2, 3], 1.0, None, 0.9)
    out, u, no_logits = np.zeros((2, 5), np.int32), np.full((2, 5), 0.5), np.zeros((2, 0, 11), np.float32)
    cydecode.generate_batch(st, out, u, True, no_logits)
    assert st.state[0].tolist() == [8, 8] and st.state[1].tolist() == [0, 0]  # 3 fed + 5 drawn; row 1 idle
    bad = decode_state(model, 2, 8)
    bad.start(0, [1], 1.0, None, None)
    bad.vcache = np.zeros((2, 2, 8, 3, 8), np.float32)  # (B, L, S, NH, HS): not the layout the loop reads
    with pytest.raises(ValueError, match="vcache"):
        cydecode.generate_batch(bad, out, u, True, no_logits)
    bad = decode_state(model, 2, 8)
    bad.start(1, [1], 1.0, None, None)
    with pytest.raises(ValueError, match="uniforms"):
        cydecode.generate_batch(bad, out, u[:1], True, no_logits)


def test_one_row_calls_keep_the_faster_thread_count():
    """The choice between a team and one thread for one stream: two calls on the kept count, then a
    probe of two calls on the other; the faster per character (the better of the two) is kept."""
    cydecode.set_one_row_threads(None)
    try:
        for _ in range(2):
            assert not cydecode._probing()
            cydecode._timed_call(True, 10e-6, False)  # the team: 10 us a character
        assert cydecode._probing()
        cydecode._timed_call(False, 7e-6, True)
        cydecode._timed_call(False, 5e-6, True)  # one thread: 5 us
        assert cydecode.one_row_threads() == (1, 5e-6, 10e-6)
        while not cydecode._probing():
            cydecode._timed_call(False, 5e-6, False)
        cydecode._timed_call(True, 3e-6, True)
        cydecode._timed_call(True, 4e-6, True)  # the team now: 3 us
        assert cydecode.one_row_threads() == (0, 5e-6, 3e-6)
        gaps = []  # probes that keep the count come twice as far apart each time
        for _ in range(3):
            n = 0
            while not cydecode._probing():
                cydecode._timed_call(True, 3e-6, False)
                n += 1
            gaps.append(n)
            cydecode._timed_call(False, 6e-6, True)
            cydecode._timed_call(False, 6e-6, True)
            assert cydecode.one_row_threads()[0] == 0
        assert gaps[1] == 2 * gaps[0] and gaps[2] == 2 * gaps[1]
    finally:
        cydecode.set_one_row_threads(None)


def test_a_team_probes_one_thread_on_the_first_characters_of_a_call():
    """On the team, a probe of one thread is the first 32 characters of a long enough call, run on
    the main thread alone and timed apart from the rest (one call decides); on one thread, or with
    short calls, probes are whole calls of the team (two decide)."""
    cydecode.set_one_row_threads(None)
    try:
        for _ in range(2):
            assert not cydecode._probing()
            cydecode._timed_call(True, 10e-6, False)
        assert cydecode._probing() and cydecode._prefix_due(256) and not cydecode._prefix_due(63)
        cydecode._prefix_probe(5e-6, 10e-6)  # one thread faster: chosen at once
        assert cydecode.one_row_threads() == (1, 5e-6, 10e-6) and not cydecode._probing()
        while not cydecode._probing():
            cydecode._timed_call(False, 5e-6, False)
        assert not cydecode._prefix_due(256)  # on one thread: whole calls of the team
        cydecode._timed_call(True, 3e-6, True)
        cydecode._timed_call(True, 4e-6, True)
        assert cydecode.one_row_threads() == (0, 5e-6, 3e-6)
        n = 0
        while not cydecode._probing():
            cydecode._timed_call(True, 3e-6, False)
            n += 1
        cydecode._prefix_probe(6e-6, 3e-6)  # the team stays: the next probe twice as far
        m = 0
        while not cydecode._probing():
            cydecode._timed_call(True, 3e-6, False)
            m += 1
        assert cydecode.one_row_threads()[0] == 0 and m == 2 * n
    finally:
        cydecode.set_one_row_threads(None)


def test_a_prefix_probe_runs_32_characters_alone_and_changes_no_character():
    model = make_model("rope", ctx=16, shape="fused")
    set_threads(2)
    try:
        cydecode.set_one_row_threads(True)
        want = generate(model, TOK, "ab", 1024, top_p=0.9, seed=4)
        for _ in range(5):  # again if the host stalled a helper: the calls after a stall run solo,
            # uncounted, and the probe with them (a spell that ran out in the last call left no steps)
            cydecode._end_solo_spell()
            cydecode.set_one_row_threads(None)  # the team, probing after two timed calls
            chars, stalls = cydecode.one_row_chars(), cydecode.stalls()
            got = generate(model, TOK, "ab", 1024, top_p=0.9, seed=4)  # calls: prompt + 256, 256, 256, probe 256
            if cydecode.stalls() == stalls:
                break
        alone, team = (a - b for a, b in zip(cydecode.one_row_chars(), chars, strict=True))
        assert alone == 32 and team == 1024 - 32
        assert got == want
    finally:
        cydecode._end_solo_spell()
        cydecode.set_one_row_threads(None)
        set_threads(None)


def test_a_slow_wait_sends_the_next_characters_solo_counted_in_steps_not_calls():
    """After a helper held a call up, the solo spell lasts SOLO_STEPS characters (256), whatever the
    calls' size: one stream's calls inside it run on one thread and are not one-row team calls; the
    call after it is; a second slow call doubles the spell, a clean team call resets it."""
    model = make_model("rope", ctx=16, shape="fused")
    set_threads(2)
    cydecode.set_one_row_threads(False)
    try:
        cydecode._end_solo_spell()
        cydecode._slow_call()
        spell = cydecode.solo_steps_left()
        assert spell == 256
        calls = cydecode.one_row_calls()
        generate(model, TOK, "ab", 100, seed=1)  # 100 of the 256 steps (and 1 of the prompt)
        assert 150 <= cydecode.solo_steps_left() <= 156
        generate(model, TOK, "ab", 200, seed=1)
        assert cydecode.solo_steps_left() == 0 and cydecode.one_row_calls() == calls  # all solo
        generate(model, TOK, "ab", 50, seed=1)
        assert cydecode.one_row_calls()[1] > calls[1]  # the team again
        cydecode._end_solo_spell()  # (had the host stalled the helper in that call, a spell would have begun)
        cydecode._slow_call()
        assert cydecode.solo_steps_left() == spell
        cydecode._slow_call()
        assert cydecode.solo_steps_left() == 2 * spell
    finally:
        cydecode._end_solo_spell()
        cydecode.set_one_row_threads(None)
        set_threads(None)


@pytest.mark.parametrize("shape", SHAPES)
def test_one_stream_text_is_the_same_on_one_thread_and_on_the_team(shape):
    model = make_model("rope", ctx=16, shape=shape)
    set_threads(2)
    texts = {}
    try:
        for one in (True, False):
            cydecode.set_one_row_threads(one)
            texts[one] = generate(model, TOK, "ab", 400, top_p=0.9, seed=3)
            _, on_one, on_team = cydecode.one_row_threads()
            assert (on_team if one else on_one) == 0.0  # every timed call ran on the count chosen
    finally:
        cydecode.set_one_row_threads(None)
        set_threads(None)
    assert texts[True] == texts[False]


@pytest.mark.skipif(not cydecode.packed_available("bf16"), reason="no AVX512_BF16: bf16 models decode in fp32")
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_model_decodes_with_bf16_products_batch_independent(shape, monkeypatch):
    model = make_model("rope", precision="bf16", shape=shape)
    monkeypatch.setattr(model.kernels, "kv16_ok", lambda *args: False)  # float32 caches: the products alone
    fp32 = make_model("rope", shape=shape)
    B, N = 16, 20
    prompts = [[b % 11, (3 * b) % 11] for b in range(B)]
    batched = np.zeros((B, N, 11), np.float32)
    list(batch_tokens(model, prompts, N, 1.0, None, None, stream_rngs(2, B), 8, logits=batched))
    for b in (0, 5, 15):
        single = np.zeros((N, 11), np.float32)
        list(compiled_tokens(model, prompts[b], N, 1.0, None, None, stream_rngs(2, B)[b], 8, logits=single))
        np.testing.assert_array_equal(batched[b], single)  # the same vdpbf16ps chains, whatever the batch
    # the prompt's logits: bf16 products (the training forward's rounding), not fp32 ones
    model.forward(np.array([prompts[0]]))
    np.testing.assert_allclose(batched[0, 0], model.logits[0, -1], rtol=1e-4, atol=1e-4)
    fp32.forward(np.array([prompts[0]]))
    assert np.abs(batched[0, 0] - fp32.logits[0, -1]).max() > 1e-4


def test_bf16_caches_where_the_products_run_in_bf16(isa_path):
    """A bf16 model (where the path has bf16 products: AVX512_BF16) with heads of 16 and an even window
    keeps bf16 keys and values (half the bytes); every other model float32 ones."""
    cases = [("fused", 8, "fp32", False)]
    if cydecode.packed_available("bf16"):
        cases += [("fused", 8, "bf16", True), ("fused", 7, "bf16", False), ("unfused", 8, "bf16", False)]
    for shape, ctx, precision, want in cases:  # heads of 16, an odd window, heads of 8
        st = decode_state(make_model("rope", ctx=ctx, precision=precision, shape=shape), 3, ctx)
        assert st.kcache.dtype == st.vcache.dtype == (np.uint16 if want else np.float32), (shape, ctx, precision)
        assert st.kcache.shape == (3, 2, SHAPES[shape][0], ctx)


@pytest.mark.skipif(not cydecode.packed_available("bf16"), reason="no AVX512_BF16: bf16 models decode in fp32")
def test_the_memory_check_counts_bf16_caches_at_two_bytes():
    """n streams' caches of a bf16 model take half the bytes: a memory that fits them (and not the float32
    caches) passes the check for bf16 and is refused for fp32, whose hint names the count that fits."""
    models = {p: make_model("rope", ctx=64, precision=p, shape="fused") for p in ("bf16", "fp32")}
    cfg, n = models["fp32"].cfg, 1000
    kv32 = n * 2 * cfg.n_layer * cfg.d_model * 64 * 4
    assert sampler.cache_dtype(models["bf16"], 64) is np.uint16
    assert decode_state(models["bf16"], 2, 64).kcache.nbytes == 2 * 2 * cfg.n_layer * cfg.d_model * 64
    sampler.check_streams_memory(models["bf16"], n, 64, available=kv32 * 3 // 4)
    with pytest.raises(ConfigError, match="1,000 streams together need about") as info:
        sampler.check_streams_memory(models["fp32"], n, 64, available=kv32 * 3 // 4)
    assert "lower --num-samples to 7" in info.value.hint  # 7xx: about 3/4 of the 1,000 streams fit


@pytest.mark.skipif(not cydecode.packed_available("bf16"), reason="no AVX512_BF16: bf16 models decode in fp32")
def test_bf16_caches_change_the_logits_by_bf16_rounding_only(monkeypatch):
    """The same greedy draws with float32 caches (kv16_ok switched off): logits within bf16's rounding
    of the attention (2 % of their range), and not equal (the bf16 caches were used)."""
    model = make_model("rope", precision="bf16", shape="fused")
    prompts = [[b % 11, (5 * b + 1) % 11, (3 * b) % 11] for b in range(4)]

    def logits() -> np.ndarray:
        out = np.zeros((4, 12, 11), np.float32)
        list(batch_tokens(model, prompts, 12, 0.0, None, None, stream_rngs(2, 4), 8, logits=out))
        return out

    kv16 = logits()
    monkeypatch.setattr(model.kernels, "kv16_ok", lambda *args: False)
    fp32 = logits()
    assert decode_state(model, 1, 8).kcache.dtype == np.float32
    scale = np.abs(fp32).max()
    assert 0 < np.abs(kv16 - fp32).max() < 0.02 * scale


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_stages_halve_the_meetings_and_keep_the_logits(isa_path, threads):
    """Two heads of 16: each layer runs 2 stages, not 4 (stages_run counts them), on one thread and on
    two, and every draw's logits still equal a full forward over the cached tokens."""
    C, H, hidden = SHAPES["fused"]
    set_threads(threads)
    try:
        counts = {}
        for shape in SHAPES:
            model = make_model("rope", ctx=16, shape=shape)
            before = cydecode.stages_run()
            generate(model, TOK, "abc", 40, top_p=0.9, seed=1)
            counts[shape] = cydecode.stages_run() - before
    finally:
        set_threads()
    L = model.cfg.n_layer
    assert counts["unfused"] % (4 * L) == 0 and counts["unfused"] > 0
    assert counts["fused"] * 2 == counts["unfused"]
    n = 11  # the prompt and the draws fit the window: the cache holds what a full forward sees
    logits = np.zeros((n, 11), np.float32)
    prompt = [3, 1, 4, 1, 5]
    ids = [int(t) for b in compiled_tokens(model, prompt, n, 1.0, None, None, np.random.default_rng(2), 16,
                                           logits=logits) for t in b]  # fmt: skip
    cached = list(prompt)
    for i, token in enumerate(ids):
        model.forward(np.array([cached]))
        np.testing.assert_allclose(logits[i], model.logits[0, -1], rtol=1e-4, atol=1e-5, err_msg=f"draw {i}")
        cached.append(token)
    assert (C, H, hidden) == (model.cfg.d_model, model.cfg.n_head, model.cfg.mlp_hidden)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_first_layer_lookup_gives_the_products_values_bit_for_bit(isa_path, precision):
    """Rotary positions: the first attention's q, k, v come from a table of the vocabulary's rows
    (pack_weights' lookup), the values the product computes: every draw's logits, and 64 streams'
    texts, are the same bits with the lookup and without; learned positions, or a vocabulary wider
    than C, build none."""
    if precision == "bf16" and not cydecode.packed_available("bf16"):
        pytest.skip("no packed bf16 product on this path (AVX512_BF16)")
    model = make_model("rope", ctx=16, shape="fused", precision=precision)
    plan = decode_table(model.cfg, model.params.offsets, 16)
    lookup = sampler.packed_weights(model, plan)[3]
    assert lookup.shape == ((11, 3 * model.cfg.d_model) if cydecode.packed_available(precision) else (0, 0))
    learned = make_model("learned", shape="fused")
    assert not cydecode.first_layer_lookup(decode_table(learned.cfg, learned.params.offsets, 8).table, 11)
    assert not cydecode.first_layer_lookup(plan.table, model.cfg.d_model + 1)
    assert cydecode.first_layer_lookup(plan.table, model.cfg.d_model)
    got = {}
    try:
        for on in (True, False):
            cydecode.set_first_layer_lookup(on)
            logits = np.zeros((30, 11), np.float32)
            ids = [int(t) for b in compiled_tokens(model, [3, 1, 4], 30, 1.0, None, 0.9, np.random.default_rng(2), 16,
                                                   logits=logits) for t in b]  # fmt: skip
            texts = generate(model, TOK, "abc", 60, top_p=0.9, seed=5, num_samples=64)
            got[on] = (ids, logits, texts)
    finally:
        cydecode.set_first_layer_lookup(True)
    assert got[True][0] == got[False][0] and got[True][2] == got[False][2]
    np.testing.assert_array_equal(got[True][1], got[False][1])


@pytest.mark.parametrize("options", [{}, {"norm": "layernorm", "activation": "gelu", "position": "learned"}])
def test_stages_published_early_change_no_bit(isa_path, options):
    """On two threads the Cython loop publishes each fused stage that follows a fused stage and a norm
    before the main thread has summed the stage before it (the helper sums and normalises itself):
    the logits of every draw and 8 streams' texts are the same bits with it and without, and all
    but the first stage of each character go early (3 of 4 at two layers)."""
    C, H, hidden = SHAPES["fused"]
    cfg = ModelConfig(vocab_size=11, d_model=C, n_layer=2, n_head=H, ctx=16, mlp_hidden=hidden, **options)
    model = Model(cfg, backend="cython", seed=4)
    model.params.flat[:] += np.random.default_rng(0).normal(0, 0.3, model.params.flat.size).astype(np.float32)
    set_threads(2)
    cydecode.set_one_row_threads(False)
    cydecode._end_solo_spell()  # (a spell left by an earlier stall would run these calls on one thread)
    stalls = cydecode.stalls()
    got = {}
    try:
        for on in (True, False):
            cydecode.set_early_publish(on)
            early, stages = cydecode.early_published(), cydecode.stages_run()
            logits = np.zeros((40, 11), np.float32)
            ids = [int(t) for b in compiled_tokens(model, [3, 1, 4], 40, 1.0, None, 0.9, np.random.default_rng(2), 16,
                                                   logits=logits) for t in b]  # fmt: skip
            early, stages = cydecode.early_published() - early, cydecode.stages_run() - stages
            texts = generate(model, TOK, "abc", 50, top_p=0.9, seed=5, num_samples=8)
            got[on] = (ids, logits, texts, early, stages)
    finally:
        cydecode.set_early_publish(True)
        cydecode.set_one_row_threads(None)
        cydecode._end_solo_spell()
        set_threads(None)
    assert got[True][0] == got[False][0] and got[True][2] == got[False][2]
    np.testing.assert_array_equal(got[True][1], got[False][1])
    assert got[False][3] == 0
    if cydecode.stalls() == stalls:  # (after a stall of the host, calls run solo: no stage is published then)
        assert 4 * got[True][3] == 3 * got[True][4] > 0


def test_the_decode_plan_names_each_rows_stage():
    """`fastchar info --plan` (describe_decode) says which rows share a stage: 2 a layer fused, 4 not."""
    from fastchar.sampler import describe_decode

    for shape, per_layer in (("fused", 2), ("unfused", 4)):
        lines = describe_decode(make_model("rope", shape=shape))
        stages = {line.split("stage ")[1].split()[0].rstrip(",") for line in lines if "stage " in line}
        assert len(stages) == per_layer * 2, (shape, lines)  # 2 layers
        assert sum("fused (2 parts of K)" in line for line in lines) == (2 * 2 if shape == "fused" else 0)
        assert "main thread" in lines[-1]  # the head's one-row product
        looked_up = "qkv from a table of the 11 tokens" in lines[2]  # rotary positions, V <= C: first_layer_lookup
        assert looked_up == cydecode.packed_available("fp32") and "qkv from a table" not in "".join(lines[3:])


def test_stream_text_does_not_depend_on_the_other_streams(isa_path):
    model = make_model("learned", ctx=12)
    prompts = [f"{'abcdefghij'[i % 10]}a" for i in range(64)]
    together = generate(model, TOK, prompts, 50, top_p=0.9, seed=7)
    for i in (0, 17, 63):
        alone = [
            next(iter(batch_tokens(model, [[TOK.stoi[c] for c in prompts[i]]], 50, 0.8, None, 0.9, [rng], 12, 64)))
            for rng in [stream_rngs(7, 64)[i]]
        ][0]
        assert together[i] == prompts[i] + "".join(TOK.chars[t] for t in alone[0])
    assert together[:3] == generate(model, TOK, prompts[:3], 50, top_p=0.9, seed=7)  # a shorter batch
    assert len(set(together)) > 32  # the streams differ


def test_num_samples_and_lists_keep_the_single_prompt_api():
    model = make_model("learned")
    one = generate(model, TOK, "ab", 20, seed=1)
    assert isinstance(one, str) and one == "".join(["ab", *stream(model, TOK, "ab", 20, seed=1)])
    many = generate(model, TOK, "ab", 20, seed=1, num_samples=4)
    assert isinstance(many, list) and len(many) == 4 and all(t.startswith("ab") and len(t) == 22 for t in many)
    pairs = generate(model, TOK, ["ab", "c"], 20, seed=1, num_samples=2)
    assert [t[: len(p)] for t, p in zip(pairs, ["ab", "ab", "c", "c"], strict=True)] == ["ab", "ab", "c", "c"]
    assert pairs[0] != pairs[1] and len(pairs[2]) == 21
    with pytest.raises(ConfigError):
        generate(model, TOK, "ab", 20, num_samples=0)
    with pytest.raises(ConfigError):
        generate(model, TOK, "ab", 20, stop=[""])


def test_numba_runs_many_streams_one_after_another_with_the_same_text():
    try:
        nb = make_model("learned", backend="numba")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"numba backend unavailable: {exc}")
    cy = make_model("learned")
    assert batch_loop(nb) is None and batch_loop(cy) is not None
    assert generate(nb, TOK, ["ab", "c"], 30, seed=2) == generate(cy, TOK, ["ab", "c"], 30, seed=2)


def _text(model, prompt, n):
    return generate(model, TOK, prompt, n, seed=3)[len(prompt) :]


def _late_stop(text: str) -> str:
    """A 3-character piece of text whose first occurrence is past two windows of 8 (refills)."""
    return next(text[j : j + 3] for j in range(16, len(text) - 3) if text.find(text[j : j + 3]) >= 16)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_stop_strings(backend):
    model = make_model("learned", backend=backend)
    text = _text(model, "ab", 60)  # 60 > 7 windows of 8; the same seed draws the same text with stops
    # at the start: the first new characters are a stop string -> nothing
    assert generate(model, TOK, "ab", 60, seed=3, stop=[text[:2]]) == "ab"
    # across refills of the cache
    stop = _late_stop(text)
    cut = text.find(stop)
    assert cut >= 16
    assert generate(model, TOK, "ab", 60, seed=3, stop=[stop]) == "ab" + text[:cut]
    # the earliest of several wins; one never produced changes nothing
    stops = ["zz", stop, text[cut + 5 : cut + 9]]
    assert generate(model, TOK, "ab", 60, seed=3, stop=stops) == "ab" + text[:cut]
    assert generate(model, TOK, "ab", 60, seed=3, stop=["zz", "\n\n\n\n\n\n\n\nj"]) == "ab" + text
    # max_new_tokens still bounds a stream
    assert generate(model, TOK, "ab", 10, seed=3, stop=["zz"]) == "ab" + text[:10]
    # several streams: each is cut at its own stop (stream i's generator differs from seed=3's)
    texts = generate(model, TOK, ["ab", "ab"], 60, seed=3)
    stops = [_late_stop(t[2:]) for t in texts]
    cut_texts = generate(model, TOK, ["ab", "ab"], 60, seed=3, stop=stops)
    for t, s_, got in zip(texts, stops, cut_texts, strict=True):
        assert got == t[: 2 + min(i for i in (t[2:].find(x) for x in stops) if i >= 0)]
        assert s_ not in got[2:]


def test_stop_scan_holds_back_a_possible_start():
    scan = StopScan(["xyz"])
    assert scan.feed("abx") == "a"  # the last len("xyz") - 1 characters are held back
    assert scan.feed("y") == "b"
    assert scan.feed("zq") == ""  # "xyz" found: the held "xy" is dropped
    assert scan.done and scan.feed("more") == "" and scan.flush() == ""
    scan = StopScan(["xyz"])
    assert scan.feed("abxy") + scan.flush() == "abxy"


def test_stop_scan_keeps_only_its_held_tail_and_cuts_at_the_first_stop():
    """The scan kept every character a stream made and copied them all at each feed (quadratic in
    the stream's length: a 1,000,000-character stream with a stop string copied ~500 GB); it keeps
    only what it holds back, and its output is the text cut before the first stop string."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        stops = ["".join(rng.choice(list("abc"), int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 4)))]
        text = "".join(rng.choice(list("abcd"), int(rng.integers(0, 60))))
        scan, out, at = StopScan(stops), "", 0
        while at < len(text):
            k = int(rng.integers(1, 6))
            out += scan.feed(text[at : at + k])
            at += k
            assert scan.done or len(scan.text) <= scan.hold
        out += scan.flush()
        hits = [i for i in (text.find(t) for t in stops) if i >= 0]
        assert out == (text[: min(hits)] if hits else text), (stops, text)
        assert scan.done == bool(hits)


def test_cli_num_samples_and_stop(tmp_path, capsys):
    from fastchar.checkpoint import save
    from fastchar.cli import main

    model = make_model("learned")
    save(model, tmp_path / "ck", tokenizer=TOK)
    texts = generate(model, TOK, "ab", 40, seed=5, num_samples=3)
    stop = _late_stop(texts[0][2:])
    assert main(["sample", "--checkpoint", str(tmp_path / "ck"), "--prompt", "ab", "--seed", "5",
                 "--max-new-tokens", "40", "--num-samples", "3", "--stop", stop]) == 0  # fmt: skip
    out = capsys.readouterr().out
    blocks = [t[: 2 + t[2:].find(stop)] if stop in t[2:] else t for t in texts]
    assert out == "".join(f"--- sample {i + 1} ---\n{b}\n" for i, b in enumerate(blocks))


def _edge_cases():
    r = np.random.default_rng(3)
    yield np.zeros(7, np.float32), "equal probabilities"
    yield np.array([2, 2, 1, 1, 1, 0, 2], np.float32), "ties"
    yield np.array([5], np.float32), "one id"
    yield np.array([0, 0, 30, 30, -30], np.float32), "two certain"
    for _ in range(40):
        yield np.round(r.normal(0, 1.5, int(r.integers(2, 70)))).astype(np.float32), "random ties"
        yield r.normal(0, 2, 65).astype(np.float32), "random"


@pytest.mark.parametrize("top_p", [-0.5, 0.0, 1e-12, 0.1, 0.5, 0.9, 1 - 1e-12, 1.0])  # <= 0: all V sorted
@pytest.mark.parametrize("top_k", [None, 1, 2, 5, 100])
def test_partial_selection_equals_sorted_reference(top_p, top_k):
    for logits, what in _edge_cases():
        got = cydecode.token_probs(logits, 0.7, 0 if top_k is None else top_k, top_p)
        want = token_probs(logits, 0.7, top_k, top_p)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{what}, p={top_p}, k={top_k}")
        assert (got > 0).sum() == (want > 0).sum()
    # tiny p is greedy (lowest id on ties); equal probabilities keep the lowest ids
    assert np.argmax(cydecode.token_probs(np.array([1, 3, 3, 0], np.float32), 1.0, 0, 1e-9)) == 1
    half = cydecode.token_probs(np.zeros(8, np.float32), 1.0, 0, 0.5)
    np.testing.assert_allclose(half, [0.25] * 4 + [0] * 4)


def test_one_row_measurements_are_one_models():
    """The seconds a character kept for the team and for one thread are one model's: a one-row call of
    another model starts on the team and probes again (a bf16 model's characters take half an fp32
    one's time, so the fp32 model's figures would mislead its choice for a long while); a fixed count
    stays fixed."""
    cydecode.set_one_row_threads(None)
    try:
        cydecode._model_call(1000)
        for _ in range(2):
            cydecode._timed_call(True, 10e-6, False)
        cydecode._timed_call(False, 5e-6, True)
        cydecode._timed_call(False, 5e-6, True)
        assert cydecode.one_row_threads() == (1, 5e-6, 10e-6)
        cydecode._model_call(1000)  # the same model: nothing forgotten
        assert cydecode.one_row_threads() == (1, 5e-6, 10e-6)
        cydecode._model_call(2000)  # another: the team, no figures, a probe after two calls
        assert cydecode.one_row_threads() == (0, 0.0, 0.0) and not cydecode._probing()
        cydecode._timed_call(True, 3e-6, False)
        cydecode._timed_call(True, 3e-6, False)
        assert cydecode._probing()
        cydecode.set_one_row_threads(True)  # fixed: another model keeps it
        cydecode._model_call(3000)
        assert cydecode.one_row_threads()[0] == 1
    finally:
        cydecode.set_one_row_threads(None)


def test_a_call_of_another_model_forgets_the_last_ones_figures():
    first, second = make_model("rope", ctx=16, shape="fused"), make_model("rope", ctx=16, shape="fused")
    set_threads(2)
    try:
        cydecode.set_one_row_threads(None)
        generate(first, TOK, "ab", 1024, top_p=0.9, seed=4)
        cydecode._timed_call(False, 1e-9, True)  # one thread "measured" absurdly fast for the first model
        cydecode._timed_call(False, 1e-9, True)
        assert cydecode.one_row_threads()[1] == 1e-9
        cydecode._end_solo_spell()  # (a stall of the host would send the next call solo: no one-row call)
        generate(second, TOK, "ab", 40, top_p=0.9, seed=4)  # its prompt's call: one row, not timed
        assert cydecode.one_row_threads()[1] != 1e-9
        cydecode._timed_call(False, 1e-9, True)
        cydecode._timed_call(False, 1e-9, True)
        cydecode._end_solo_spell()
        generate(first, TOK, "ab", 40, top_p=0.9, seed=4)
        assert cydecode.one_row_threads()[1] != 1e-9  # and back: afresh again
    finally:
        cydecode._end_solo_spell()
        cydecode.set_one_row_threads(None)
        set_threads(None)
