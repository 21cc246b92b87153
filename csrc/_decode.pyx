# cython: language_level=3
"""fastchar._cydecode: the Cython backend's compiled generation loop (see fastchar/backends/cython_decode.py).

`generate_batch` runs fastchar/sampler.py's loop (the cache rule of KVCache.advance, sampling) for
a chunk of new characters of B streams in one nogil call (one stream is the batch of one row). The
network is not written here: each position runs
the rows of fastchar.graph.decode_table (opcode, scratch offsets, weight offsets found by name in
the parameter arena), the decode step of the one description in fastchar/graph.py. The numerical
pieces are C in fc_decode.c, the sampler is fc_sample.c (shared with the Numba loop).

A forward runs M positions at once (1 for a decode step, window/2 for a refill, the prompt's length
for the prompt): each weight row is read once per call and reused for all M rows.

Threads (OpenMP's count, i.e. fastchar.set_threads; at most max(2, C // 32)): at batch 1 a step is
~0.8 M multiply-adds, mostly streaming ~3 MB of weights, so each matrix product's output columns
(and the attention heads) are split across the threads, each streaming its share of the weights.
The main thread walks the table (norms, embedding, sampling) and publishes each product as a stage
of tasks (fc_team in fc_decode.h): it takes the first itself, the helpers claim the others (so each
core streams the same share of the weights every time, from its own cache), and the main thread
takes any a helper has not started. It never waits at a barrier for a
helper that has not started, so a helper descheduled by other work on the machine costs little, and
one that holds it up mid-task sends the next calls single-threaded for a while (SLOW_WAIT,
SOLO_STEPS). A task computes each value exactly as the single-threaded product would: the thread
count never changes the result. On two threads a fused stage after a fused stage and a norm is
published before the main thread has summed the stage before it; the helper sums and takes the norm
itself (_early, _prelude).

Letters in shapes: S the window (cache rows), C channels, NH heads, HS head size, V vocabulary,
L layers, N new tokens per call, P the flat parameter count, R table rows.
`generate_batch` advances B streams together: each step runs the same table on M rows, one per
stream still running (so each weight row is read once for all of them), and row m attends to its
own stream's cache (Net.batch). A stream whose learned-position cache is full is refilled on its
own. Its arguments are one object, fastchar.sampler.DecodeState. The draws of many streams are a
stage too (STAGE_SAMPLE: each task draws a range of the streams).

Not here: float64 (the Python loop in fastchar/sampler.py covers both).
"""

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

cdef extern from "<stdlib.h>" nogil:
    void* aligned_alloc(size_t alignment, size_t size)

from fc cimport (fc_attention, fc_attention_rows, fc_kv16_ok, fc_kv_append, fc_limit, fc_taken, fc_wait_finished, fc_wait_taken, fc_decode_tile_rows, fc_claim, fc_finish, fc_gelu, fc_idle, fc_layernorm, fc_prefetch, fc_matmul,
                 fc_matmul_packed, fc_matmul_packed_bf16, fc_matmul_t, fc_max_threads, fc_now, fc_pack16, fc_pack16_bf16, fc_packed_bf16_ok,
                 fc_packed_ok, fc_packed_size, fc_packed_size_bf16, fc_publish, fc_quitting, fc_rmsnorm,
                 fc_rope_heads, fc_rope_tables, fc_sample, fc_set_quit, fc_team, fc_thread_num,
                 fc_token_probs)

from fastchar import graph as _graph

# The decode table's vocabulary, defined once in fastchar/graph.py
cdef int OP_EMBED = _graph.OP_EMBED, OP_RMSNORM = _graph.OP_RMSNORM, OP_MATMUL = _graph.OP_MATMUL
cdef int OP_ATTENTION = _graph.OP_ATTENTION, OP_RESIDUAL = _graph.OP_RESIDUAL, OP_RELU2 = _graph.OP_RELU2
cdef int OP_LAYERNORM = _graph.OP_LAYERNORM, OP_GELU = _graph.OP_GELU, OP_MATMUL_T = _graph.OP_MATMUL_T
cdef int POST_NONE = _graph.POST_NONE, POST_RELU2 = _graph.POST_RELU2, POST_RESIDUAL = _graph.POST_RESIDUAL, POST_ROPE = _graph.POST_ROPE
cdef int POST_GELU = _graph.POST_GELU
cdef int ROWS_ALL = _graph.ROWS_ALL, ROWS_LAST = _graph.ROWS_LAST
cdef int OPC = _graph.OPC, OUT = _graph.OUT, IN = _graph.IN, IN2 = _graph.IN2, W = _graph.W, W2 = _graph.W2
cdef int K = _graph.K, N = _graph.N, POST = _graph.POST, LAYER = _graph.LAYER, ROWS = _graph.ROWS
cdef int NCOL = _graph.NCOL

# A helper that holds the main thread up for longer than SLOW_WAIT seconds (it was descheduled: other
# processes want the cores) sends the call solo, and the next SOLO_STEPS steps (characters of each
# stream) run single-threaded, in whole calls, twice as many each time this repeats (up to
# MAX_SOLO_STEPS), back to SOLO_STEPS after a threaded call that went well. Counted in steps, not
# calls: generate() calls the loop 256 characters at a time, and a spell of 16 such calls (4,096
# characters single-threaded) after each hiccup of the host (about one in 8,000 characters on a quiet
# 2-core guest) held one stream at 17,000-27,000 characters/s where it makes 27,000-31,000.
cdef double SLOW_WAIT = 200e-6
cdef long SOLO_STEPS = 256
cdef long MAX_SOLO_STEPS = 32768
cdef long _solo_left = 0
cdef long _solo_next = SOLO_STEPS
cdef long _stalls = 0

# A call of one running row (one stream) picks a team or one thread by measurement. The team meets at
# about 16 hand-overs a character, each costing a few cache-line round trips between the cores, and on
# a virtual machine that round trip depends on where the host runs the two virtual CPUs (70 ns and
# 230 ns on one 2-core guest, an hour apart): at the long one, two threads made a base-model
# character no faster than one, and a 64-wide model's 40 % slower. So after every PROBE_CALLS one-row
# calls that only draw (no prompt), the other count is tried, and the count with the fewer seconds a
# character (the better of its last two measurements) is kept; both give the same characters. On the
# team, a call of 2 * PROBE_STEPS characters or more runs its first PROBE_STEPS on the main thread
# alone and is timed in two parts (the probe costs 32 characters, not a call: with 256-character
# calls, whole-call probes held one stream on one thread for 6 % of its calls); otherwise (on one
# thread, or short calls) the next PROBE_LEN calls run on the other count. A probe that keeps the
# count doubles the calls to the next (up to MAX_PROBE_CALLS).
cdef int PROBE_CALLS = 32
cdef int MAX_PROBE_CALLS = 1024
cdef int PROBE_LEN = 2
cdef Py_ssize_t PROBE_STEPS = 32
cdef int _probe_every = PROBE_CALLS
cdef double _per_char[2][2]  # seconds a character of the last two timed calls on one thread [0], a team [1]
cdef int _probe_left = 2  # calls until the next probe (< 0: probing)
cdef bint _one_thread = False
cdef bint _fixed = False  # set_one_row_threads: no probes
cdef size_t _timed_model = 0  # whose one-row calls _per_char measured: the address of its parameters
cdef long _calls[2]  # one-row calls run on one thread [0] and on a team [1], since the process started
cdef long _chars[2]  # their characters (steps) run on one thread [0] (a prefix probe's too) and on a team [1]
cdef long _stages_run = 0  # stages of the decode loops (see _stage), since the process started


def stages_run() -> int:
    """Stages the decode loops have run since the process started: a stage is one meeting of the
    threads (a product, an attention, a fused pair of them, or the draws of many streams), run on
    one thread or shared."""
    return _stages_run


cdef double _best(int team) noexcept nogil:
    cdef double a = _per_char[team][0], b = _per_char[team][1]
    return a if b == 0.0 or (a > 0.0 and a < b) else b


def one_row_threads() -> tuple:
    """(threads a one-row call runs on now: 1, or 0 for the team of fastchar.set_threads; seconds a
    character on one thread and on the team, the better of the last two calls each, 0.0 if none)."""
    return (1 if _one_thread else 0, _best(0), _best(1))


def one_row_chars() -> tuple:
    """(characters of one-row calls run on one thread, on a team) since the process started; a prefix
    probe's first characters count as one thread's."""
    return (_chars[0], _chars[1])


def one_row_calls() -> tuple:
    """(one-row calls run on one thread, on a team) since the process started: the share of one
    thread that a benchmark of one stream saw."""
    return (_calls[0], _calls[1])


def set_one_row_threads(one: object = None) -> None:
    """One-row calls on one thread (True) or on the team (False) from now on, without probes; None:
    forget the measurements, start on the team and choose by measurement again (the default)."""
    global _fixed
    _start_over(bool(one))
    _fixed = one is not None


cdef void _start_over(bint one):
    """No measurements kept; one-row calls on one thread (one) or on the team, probing after two calls."""
    global _probe_left, _one_thread, _probe_every
    for i in range(2):
        _per_char[i][0] = _per_char[i][1] = 0.0
    _probe_left = 2
    _probe_every = PROBE_CALLS
    _one_thread = one


cdef void _measure_for(size_t model):
    """The measurements are one model's (its parameters' address): a one-row call of another model (a
    bf16 one after an fp32 one, say, whose characters take twice as long) starts afresh, on the team
    and probing after two calls, as set_one_row_threads(None) does, unless the count is fixed."""
    global _timed_model
    if model == _timed_model:
        return
    _timed_model = model
    if not _fixed:
        _start_over(False)


def _model_call(size_t model) -> None:
    """What a one-row call of the model whose parameters are at that address does first (for tests)."""
    _measure_for(model)


def _timed_call(bint team, double per_char, bint probe) -> None:
    """What a timed one-row call reports (for tests of the choice)."""
    _chose(team, per_char, probe)


def _prefix_probe(double alone, double team) -> None:
    """What a team call that probed one thread on its first PROBE_STEPS characters reports (seconds a
    character of each part; for tests of the choice)."""
    _chose_prefix(alone, team)


def _prefix_due(Py_ssize_t steps) -> bool:
    """Whether the next timed one-row call of that many characters is a prefix probe."""
    return not _fixed and _probe_left == 0 and not _one_thread and steps >= 2 * PROBE_STEPS


def _slow_call() -> None:
    """What a call that went solo reports (for tests of the solo spell)."""
    _after_call(True, 2, fc_now())


def stalls() -> int:
    """Calls that a helper held up (a solo spell began after each) since the process started."""
    return _stalls


def solo_steps_left() -> int:
    """Steps (characters of each stream) that the solo spell after slow waits still runs on one thread."""
    return max(_solo_left, 0)


def _end_solo_spell() -> None:
    global _solo_left, _solo_next
    _solo_left = 0
    _solo_next = SOLO_STEPS


def _probing() -> bool:
    """Whether the next timed one-row call is a probe."""
    return not _fixed and _probe_left <= 0


# What a stage's tasks do
cdef enum:
    STAGE_MATMUL = 0  # a column slice of a product, then the row's post-op on that slice
    STAGE_ATTENTION = 1  # q, k, v of a range of heads, rope, append to the cache, attention
    STAGE_SAMPLE = 2  # draw the next token of a range of the streams (Batch.draw)
    STAGE_ATTENTION_OUT = 3  # STAGE_ATTENTION of a part's heads, then that part's share of the out product
    STAGE_MLP = 4  # a part's columns of the MLP's first product and activation, then its share of the second

# A fused stage (STAGE_ATTENTION_OUT, STAGE_MLP) splits its second product over K in NPART fixed parts:
# part p's task multiplies the rows it computed itself (its heads' attention, its hidden columns) by
# the matching rows of the weights into net.part[p], and the main thread adds x2 + (part 0 + part 1)
# after the stage. So the product and the op before it need no meeting of the threads between them
# (8 stages a character instead of 16 at the base model), and the sum has the same order whatever the
# thread count, the batch or the stream.
DEF NPART = 2

# The first attention's table row (embedding, norm, attention): see first_layer_lookup
cdef enum:
    ROW_LOOKUP = 2

# Fewer streams than this draw on the main thread (a stage's handshake costs more than the draws)
cdef Py_ssize_t SAMPLE_STAGE_ROWS = 4


cdef struct Batch


cdef struct Lead:
    # the main thread's own state of a call (never read by the helpers, so kept off the Net they copy)
    long stages  # stages run (published or solo) since _setup_net
    bint solo  # the main thread runs every task itself, publishing none (see _stage)
    bint alone  # the same, for the first steps of a prefix probe only (solo stays for the call)
    bint published  # the next stage is already published (_early)
    Py_ssize_t rows_used  # its table rows
    long nfused  # fused stages described: their parts alternate between two buffers
    long early  # stages published early


cdef struct Net:
    # the model, the buffers, the team, and the stage now published (see _stage)
    const float* params
    const int64_t* table
    const double* eps
    const double* inv_freq
    Py_ssize_t R, S, C, half, n_head
    float* scratch
    char* kcache  # this stream's caches (fc_decode.h's layouts), float32 or (kv16) bf16
    char* vcache
    bint kv16
    float* scores  # (ntask, S): one row per attention task
    float* rope_cos  # (S, HS/2) rows of the positions being encoded
    float* rope_sin
    fc_team* team
    const float* packed  # the products' weights packed by pack_weights, or NULL: fc_matmul on params
    const int64_t* poff  # (R,) each table row's weights in packed
    const float* lookup  # (V, 3C) the first layer's q, k, v of each token (pack_weights), or NULL
    bint looked_up  # the published attention takes its rows' q, k, v from lookup
    const int* toks  # the rows' tokens (_forward_rows)
    bint bf16  # packed holds bf16 pairs (fc_matmul_packed_bf16)
    uint32_t* xw  # (ntask, xw_stride): each task's input rows as bf16 pairs
    Py_ssize_t xw_stride
    Py_ssize_t ntask
    Py_ssize_t nt  # tasks of the published stage: ntask, or min(ntask, NPART) for a fused one
    Lead* lead
    bint fuse  # the model's shapes allow fused stages (see _setup_net)
    float* part  # (NPART, rows, C): each part's share of a fused stage's second product (of part_base)
    float* part_base  # (2, NPART, rows, C): fused stages alternate between its halves (_early)
    Py_ssize_t part_stride
    # a stage published early (_early): a helper computes its own input, the norm of
    # pre_x2 + (pre_part 0 + pre_part 1), into mine, as the main thread computes it into xin
    bint prelude
    const float* pre_x2
    const float* pre_part
    const float* pre_w
    float pre_eps
    int pre_norm
    float* mine  # (2, rows, C): a helper's sum and its norm
    # the stage
    int kind
    int post
    float* y
    const float* xin
    const float* x2
    const float* w
    const float* wp  # the stage's packed weights (when net.packed)
    float* qkv
    Py_ssize_t M, Kd, Nd, n0
    # a fused stage's second product: y2 (M, Nd2) = x2 + x (M, Kd2 = the first's output) @ w2
    float* y2
    const float* w2
    const float* wp2
    Py_ssize_t Nd2
    char* kc
    char* vc
    int64_t pos0
    # batch mode (generate_batch): row m is stream rstream[m]'s new token at position rpos[m], its
    # key and value go to slot rslot[m] of that stream's cache, which then holds rn[m] rows
    bint batch
    char* kall  # (B, L, C*S) every stream's keys (fc_decode.h's layouts, float32 or bf16)
    char* vall  # (B, L, C*S) and values
    Py_ssize_t L
    Py_ssize_t layer
    const int64_t* rstream
    const int64_t* rslot
    const int64_t* rn
    const int64_t* rpos
    Batch* job  # the generate_batch call (STAGE_SAMPLE)


cdef inline Py_ssize_t _kv_bytes(Net* net) noexcept nogil:
    """Bytes of a cache element: 2 for bf16 caches, else 4."""
    return 2 if net.kv16 else 4


def kv16_ok(Py_ssize_t C, Py_ssize_t S, Py_ssize_t n_head) -> bool:
    """Whether caches of C channels, n_head heads and S rows can be bf16 (fc_kv16_ok: the avx512 path
    with AVX512_BF16, a head size a multiple of 16 up to 256, S even)."""
    return bool(fc_kv16_ok(C, S, n_head))


cdef tuple _caches(object kcache, object vcache, Py_ssize_t n_head):
    """Check kcache (B, L, C, S) and vcache (B, L, NH, S, HS): both float32, or both uint16 (bf16
    caches, fc_kv16_ok); returns their bytes (B * L * C * S elements, flat uint8 views: keep them for
    the call), whether bf16, and (B, L, C, S)."""
    import numpy as np

    if not (isinstance(kcache, np.ndarray) and isinstance(vcache, np.ndarray) and kcache.ndim == 4
            and vcache.ndim == 5 and kcache.dtype == vcache.dtype and kcache.dtype in (np.float32, np.uint16)):
        raise ValueError("need kcache (B, L, C, S) and vcache (B, L, NH, S, HS), both float32 or both uint16")
    B, L, C, S = kcache.shape
    if (vcache.shape[0] != B or vcache.shape[1] != L or vcache.shape[2] != n_head or vcache.shape[3] != S
            or vcache.shape[2] * vcache.shape[4] != C):
        raise ValueError("need kcache (B, L, C, S) and vcache (B, L, NH, S, HS)")
    kv16 = kcache.dtype == np.uint16
    if kv16 and not fc_kv16_ok(C, S, n_head):
        raise ValueError("bf16 caches need the avx512 path with AVX512_BF16, a head size a multiple of 16 "
                         "(at most 256) and an even window (fastchar.sampler.decode_state picks them)")
    if not (kcache.flags.c_contiguous and vcache.flags.c_contiguous):
        raise ValueError("the caches must be C-contiguous")
    return kcache.reshape(-1).view(np.uint8), vcache.reshape(-1).view(np.uint8), kv16, B, L, C, S


cdef inline Py_ssize_t _split(Py_ssize_t n, Py_ssize_t t, Py_ssize_t nt) noexcept nogil:
    """First of task t's columns of n (of nt tasks): rounded to 16 floats, one cache line."""
    cdef Py_ssize_t j
    if t >= nt:
        return n
    j = (n * t // nt + 8) // 16 * 16
    return j if j < n else n


cdef inline void _product(Net* net, Py_ssize_t i, float* y, const float* x, const float* w, const float* wp,
                          Py_ssize_t M, Py_ssize_t Kd, Py_ssize_t Nd, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """y[:M, j0:j1] = x[:M] @ W[:, j0:j1] for task i (W (Kd, Nd): w in params, or wp packed)."""
    _product_k(net, i, y, x, Kd, w, wp, M, Kd, 0, Kd, Nd, j0, j1)


cdef inline void _product_k(Net* net, Py_ssize_t i, float* y, const float* x, Py_ssize_t ldx, const float* w,
                            const float* wp, Py_ssize_t M, Py_ssize_t Kd, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t Nd,
                            Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """y[:M, j0:j1] = x[:M, k0:k1] @ W[k0:k1, j0:j1] for task i; x row stride ldx, y's Nd."""
    if net.bf16:
        fc_matmul_packed_bf16(y, x, ldx, <const uint32_t*>wp, M, Kd, k0, k1, Nd, j0, j1, net.xw + i * net.xw_stride)
    elif net.packed != NULL:
        fc_matmul_packed(y, x, ldx, wp, M, Kd, k0, k1, Nd, j0, j1)
    else:
        fc_matmul(y + j0, x + k0, ldx, w + k0 * Nd + j0, M, k1 - k0, j1 - j0, Nd, Nd)


cdef inline void _post(int post, float* y, const float* x2, Py_ssize_t M, Py_ssize_t Nd, Py_ssize_t j0,
                       Py_ssize_t j1) noexcept nogil:
    """A product's post-op on y[:M, j0:j1] (row stride Nd): + x2, relu2 or gelu."""
    cdef Py_ssize_t m, j
    cdef float r
    if post == POST_RESIDUAL:
        for m in range(M):
            for j in range(m * Nd + j0, m * Nd + j1):
                y[j] = x2[j] + y[j]
    elif post == POST_RELU2:
        for m in range(M):
            for j in range(m * Nd + j0, m * Nd + j1):
                r = y[j] if y[j] > 0 else 0.0
                y[j] = r * r
    elif post == POST_GELU:
        for m in range(M):
            for j in range(m * Nd + j0, m * Nd + j1):
                y[j] = fc_gelu(y[j])


cdef inline void _parts_out(Net* net, Py_ssize_t i, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t p) noexcept nogil:
    """A fused stage's part p: net.part[p] (M, Nd2) = x[:, k0:k1] @ w2[k0:k1, :], x the stage's first output."""
    _product_k(net, i, net.part + p * net.part_stride, net.y, net.Nd, net.w2, net.wp2, net.M, net.Nd, k0, k1,
               net.Nd2, 0, net.Nd2)


cdef void _sum_parts(float* y2, const float* x2, const float* part, Py_ssize_t stride, Py_ssize_t n) noexcept nogil:
    """After a fused stage: y2 = x2 + (part 0 + part 1 + ...), in part order (n values; parts stride apart)."""
    cdef Py_ssize_t c, p
    cdef float s
    for c in range(n):
        s = part[c]
        for p in range(1, NPART):
            s = s + part[p * stride + c]
        y2[c] = x2[c] + s


cdef inline void _norm(int opc, float* out, const float* x, const float* w, Py_ssize_t M, Py_ssize_t C,
                       float eps) noexcept nogil:
    """The norm of table opcode opc (OP_RMSNORM or OP_LAYERNORM) of M rows of C: the one place the
    loop chooses a norm's kernel (the table's row, a stage published early, the first layer's table)."""
    if opc == OP_RMSNORM:
        fc_rmsnorm(out, x, w, M, C, eps)
    else:
        fc_layernorm(out, x, w, M, C, eps)


cdef void _prelude(Net* net) noexcept nogil:
    """A helper's copy of a stage published early: its input rows, the norm of the previous stage's
    sum, computed as the main thread computes them (the same functions, the same order) into
    net.mine, and net.xin pointed there."""
    cdef Py_ssize_t n = net.M * net.C
    _sum_parts(net.mine, net.pre_x2, net.pre_part, net.part_stride, n)
    _norm(net.pre_norm, net.mine + n, net.mine, net.pre_w, net.M, net.C, net.pre_eps)
    net.xin = net.mine + n


cdef void _heads(Net* net, Py_ssize_t i, Py_ssize_t h0, Py_ssize_t h1) noexcept nogil:
    """Heads h0..h1-1 of the published attention: their columns of q, k and v (so no other task's
    output is needed), rotary positions, the keys and values into the cache, and attention."""
    cdef Py_ssize_t C = net.C, S = net.S, M = net.M, HS = net.C // net.n_head
    cdef Py_ssize_t j0 = h0 * HS, j1 = h1 * HS, m, j, part
    if h1 <= h0:
        return
    if net.looked_up:
        for m in range(M):
            for part in range(3):
                for j in range(part * C + j0, part * C + j1):
                    net.qkv[m * 3 * C + j] = net.lookup[net.toks[m] * 3 * C + j]
    else:
        fc_prefetch(net.xin, M * C * sizeof(float))  # written by the main thread just before
        for part in range(3):
            _product(net, i, net.qkv, net.xin, net.w, net.wp, M, C, 3 * C, part * C + j0, part * C + j1)
    if net.post == POST_ROPE:
        fc_rope_heads(net.qkv, net.rope_cos, net.rope_sin, M, C, net.half, h0, h1)
    if net.batch:
        fc_attention_rows(net.y, net.qkv, net.kall, net.vall, net.rstream, net.rslot, net.rn, net.L, net.layer, M, C,
                          S, net.n_head, h0, h1, net.scores + i * S, net.kv16)
        return
    for m in range(M):
        fc_kv_append(net.kc, net.vc, net.qkv + m * 3 * C, C, S, net.n_head, h0, h1, (net.pos0 + m) % S, net.kv16)
    fc_attention(net.y, net.qkv, net.kc, net.vc, net.n0, M, C, S, net.n_head, h0, h1, net.scores + i * S, net.kv16)


cdef void _task(Net* net, Py_ssize_t i) noexcept nogil:
    """Task i of the published stage: a column slice of its matrix product (and the post-op on that
    slice), a range of attention heads (_heads), or a range of a fused stage's parts: a part's heads
    or hidden columns, then its share of the second product (_parts_out). Each value is computed as
    it would be in one piece, or (a fused stage's second product) in the same NPART parts."""
    cdef Py_ssize_t j0, j1, p, p0, p1
    cdef Py_ssize_t HS = net.C // net.n_head
    if net.kind == STAGE_SAMPLE:
        _sample_rows(net.job, i, net.job.ndraw * i // net.ntask, net.job.ndraw * (i + 1) // net.ntask)
        return
    if net.kind == STAGE_ATTENTION:
        _heads(net, i, net.n_head * i // net.ntask, net.n_head * (i + 1) // net.ntask)
        return
    if net.kind == STAGE_ATTENTION_OUT or net.kind == STAGE_MLP:
        p0 = NPART * i // net.nt
        p1 = NPART * (i + 1) // net.nt
        if net.kind == STAGE_ATTENTION_OUT:
            _heads(net, i, net.n_head * p0 // NPART, net.n_head * p1 // NPART)
            for p in range(p0, p1):
                _parts_out(net, i, net.n_head * p // NPART * HS, net.n_head * (p + 1) // NPART * HS, p)
            return
        j0 = _split(net.Nd, p0, NPART)
        j1 = _split(net.Nd, p1, NPART)
        fc_prefetch(net.xin, net.M * net.Kd * sizeof(float))  # written by the main thread just before
        _product(net, i, net.y, net.xin, net.w, net.wp, net.M, net.Kd, net.Nd, j0, j1)
        _post(net.post, net.y, NULL, net.M, net.Nd, j0, j1)
        for p in range(p0, p1):
            _parts_out(net, i, _split(net.Nd, p, NPART), _split(net.Nd, p + 1, NPART), p)
        return
    j0 = _split(net.Nd, i, net.ntask)
    j1 = _split(net.Nd, i + 1, net.ntask)
    if j1 <= j0:
        return
    fc_prefetch(net.xin, net.M * net.Kd * sizeof(float))  # written by the other threads' tasks just before
    _product(net, i, net.y, net.xin, net.w, net.wp, net.M, net.Kd, net.Nd, j0, j1)
    _post(net.post, net.y, net.x2, net.M, net.Nd, j0, j1)


cdef long _begin(Net* net) noexcept nogil:
    """Main thread: publish the stage described in net (unless _early did), run its first task and
    any a helper has not started; returns the tickets published so far (_end waits for them), or -1
    if it ran solo.

    If a helper held it up for over SLOW_WAIT (descheduled mid-task: the cores are busy with other
    work), the rest of the call runs solo: every task on the main thread, in the same split.
    """
    cdef long t, lim
    cdef Py_ssize_t i
    net.lead.stages += 1
    if (net.lead.solo or net.lead.alone) and not net.lead.published:
        for i in range(net.nt):
            _task(net, i)
        return -1
    if not net.lead.published:
        fc_publish(net.team, net.nt - 1)
    net.lead.published = False
    lim = fc_limit(net.team)
    _task(net, 0)
    while True:  # then any task a helper has not started
        t = fc_claim(net.team)
        if t < 0:
            break
        fc_taken(net.team)
        _task(net, 1 + t % (net.nt - 1))
        fc_finish(net.team)
    return lim


cdef void _end(Net* net, long lim) noexcept nogil:
    """Main thread: wait until the tickets up to lim (_begin's) are finished."""
    if lim >= 0 and fc_wait_finished(net.team, lim, SLOW_WAIT):
        net.lead.solo = True


cdef void _stage(Net* net) noexcept nogil:
    """Main thread: publish the stage described in net, run tasks until none is left, wait for all."""
    _end(net, _begin(net))


cdef void _helper(Net* net) noexcept nogil:
    """Every other thread: run published tasks (a stage's first is the main thread's, never
    published) until the main thread is done. A task runs on a copy of the stage's description,
    taken as it starts (fc_taken: the main thread may then describe the next stage, see _early)."""
    cdef long t, spins = 0
    cdef Net own
    while True:
        t = fc_claim(net.team)
        if t >= 0:
            own = net[0]
            fc_taken(net.team)
            if own.prelude:
                _prelude(&own)
            _task(&own, 1 + t % (own.nt - 1))
            fc_finish(net.team)
            spins = 0
        elif fc_quitting(net.team):
            break
        else:
            fc_idle(&spins)


cdef inline bint _can_fuse(Py_ssize_t C, Py_ssize_t n_head) noexcept nogil:
    """Whether a model's shapes allow fused stages: a fused stage's parts are whole heads and
    16-column blocks (bf16 pairs, one line of y)."""
    return n_head % NPART == 0 and (C // NPART) % 16 == 0


cdef inline bint _on_main(const int64_t* row, Py_ssize_t Mr) noexcept nogil:
    """A product the main thread runs alone, no stage: the head's one-row product (the logits), not
    worth a stage's handshake."""
    return row[ROWS] != ROWS_ALL and row[POST] == POST_NONE and Mr == 1


cdef inline bint _fuses(Net* net, const int64_t* row, const int64_t* nxt) noexcept nogil:
    """Whether row (an attention, or a product with an activation after it) and nxt form a fused
    stage: nxt is a product of row's output into the residual stream (C wide), with the residual add
    after it, over the same rows."""
    return (net.fuse and nxt != NULL and nxt[OPC] == OP_MATMUL and nxt[POST] == POST_RESIDUAL and nxt[IN] == row[OUT]
            and nxt[K] == (net.C if row[OPC] == OP_ATTENTION else row[N]) and nxt[N] == net.C and nxt[IN2] >= 0
            and (net.batch or (row[ROWS] == ROWS_ALL and nxt[ROWS] == ROWS_ALL))
            and (row[OPC] == OP_ATTENTION or row[N] >= 16 * NPART))


cdef inline void _second(Net* net, const int64_t* nxt, Py_ssize_t r) noexcept nogil:
    """A fused stage's second product: table row nxt (index r)."""
    net.y2 = net.scratch + nxt[OUT]
    net.x2 = net.scratch + nxt[IN2]
    net.w2 = net.params + nxt[W]
    net.wp2 = net.packed + net.poff[r] if net.packed != NULL else NULL
    net.Nd2 = nxt[N]
    net.nt = net.ntask if net.ntask < NPART else NPART
    net.part = net.part_base + (net.lead.nfused % 2) * NPART * net.part_stride  # (_early: the previous stage's stay)
    net.lead.nfused += 1


cdef Py_ssize_t _describe(Net* net, Py_ssize_t ri, Py_ssize_t M) noexcept nogil:
    """Describe in net the stage of table row ri (a product the main thread does not run alone, or an
    attention) for M new rows, with the row after it if they fuse; returns the rows it takes."""
    cdef const int64_t* row = net.table + ri * NCOL
    cdef const int64_t* nxt = row + NCOL if ri + 1 < net.R else NULL
    cdef Py_ssize_t Mr = M if row[ROWS] == ROWS_ALL or net.batch else 1  # a batch needs every stream's logits
    cdef Py_ssize_t Kd = row[K], Nd = row[N], S = net.S, C = net.C
    cdef float* out = net.scratch + row[OUT]
    cdef const float* xin = net.scratch + row[IN] + ((M - 1) * Kd if row[ROWS] == ROWS_LAST and not net.batch else 0)
    net.prelude = False
    net.nt = net.ntask
    net.wp = net.packed + net.poff[ri] if net.packed != NULL else NULL
    if row[OPC] == OP_MATMUL:
        net.kind = STAGE_MATMUL
        net.y, net.xin, net.w, net.M, net.Kd, net.Nd, net.post = out, xin, net.params + row[W], Mr, Kd, Nd, row[POST]
        net.x2 = net.scratch + row[IN2] if row[IN2] >= 0 else NULL
        if (row[POST] == POST_RELU2 or row[POST] == POST_GELU) and _fuses(net, row, nxt):
            net.kind = STAGE_MLP
            _second(net, nxt, ri + 1)
            return 2
        return 1
    net.kind = STAGE_ATTENTION
    net.y, net.xin, net.w, net.M, net.post = out, xin, net.params + row[W], Mr, row[POST]
    net.Nd = C
    net.qkv = net.scratch + row[IN2]
    net.layer = row[LAYER]
    net.looked_up = net.lookup != NULL and ri == ROW_LOOKUP
    net.kc = net.kcache + row[LAYER] * S * C * _kv_bytes(net)
    net.vc = net.vcache + row[LAYER] * S * C * _kv_bytes(net)
    if _fuses(net, row, nxt):
        net.kind = STAGE_ATTENTION_OUT
        _second(net, nxt, ri + 1)
        return 2
    return 1


cdef bint _early_on = True
cdef long _early_run = 0  # stages published early (_early), since the process started


def early_published() -> int:
    """Stages the Cython loop published before the one before them was summed (_early), since the
    process started."""
    return _early_run


def set_early_publish(bint on) -> None:
    """Whether the Cython loop publishes a stage before the one before it is summed (_early; for tests
    and comparisons, default on): the same characters either way."""
    global _early_on
    _early_on = on


cdef bint _early(Net* net, Py_ssize_t r) noexcept nogil:
    """Whether the stage after the fused stage just begun (its rows end before r) can be published
    before the main thread adds its parts and takes the norm: row r is a norm of that sum and row
    r + 1 a stage that fuses, reads the norm, and adds into that sum; one helper ticket a stage
    (two threads). The helper then computes the sum and the norm itself (_prelude) from the stage's
    residual input and parts, which nothing overwrites before it has finished."""
    cdef const int64_t* prev = net.table + (r - 1) * NCOL  # the fused stage's second product
    cdef const int64_t* nrm
    cdef const int64_t* row
    cdef const int64_t* nxt
    if net.ntask != 2 or r + 2 >= net.R:
        return False
    nrm = net.table + r * NCOL
    row = nrm + NCOL
    nxt = row + NCOL
    return ((nrm[OPC] == OP_RMSNORM or nrm[OPC] == OP_LAYERNORM) and nrm[IN] == prev[OUT] and nrm[N] == net.C
            and (net.batch or nrm[ROWS] == ROWS_ALL) and row[IN] == nrm[OUT]
            and (row[OPC] == OP_ATTENTION or (row[OPC] == OP_MATMUL and (row[POST] == POST_RELU2 or row[POST] == POST_GELU)))
            and _fuses(net, row, nxt) and nxt[IN2] == prev[OUT]
            and prev[IN2] != prev[OUT] and nrm[OUT] != prev[IN2] and row[OUT] != prev[IN2]
            and (row[OPC] != OP_ATTENTION or row[IN2] != prev[IN2]))


cdef void _run_stage(Net* net, Py_ssize_t r, Py_ssize_t M) noexcept nogil:
    """Main thread: run the stage described in net (its rows end before r): _begin, then, if _early
    allows, describe and publish the next stage before waiting for this one's helper, _end, and the
    sum of a fused stage's parts."""
    cdef bint fused = net.kind == STAGE_MLP or net.kind == STAGE_ATTENTION_OUT
    cdef float* y2 = net.y2
    cdef const float* x2 = net.x2
    cdef const float* part = net.part
    cdef Py_ssize_t n = net.M * net.Nd2
    cdef const int64_t* nrm = net.table + r * NCOL
    cdef long lim = _begin(net)
    if fused and lim >= 0 and _early_on and not net.lead.solo and _early(net, r):
        fc_wait_taken(net.team, lim, SLOW_WAIT)  # the helper has its copy of this stage's description
        net.lead.rows_used = _describe(net, r + 1, M)
        net.prelude = True
        net.pre_x2, net.pre_part, net.pre_w = x2, part, net.params + nrm[W]
        net.pre_eps, net.pre_norm = <float>net.eps[r], <int>nrm[OPC]
        fc_publish(net.team, net.nt - 1)
        net.lead.published = True
        net.lead.early += 1
    _end(net, lim)
    if fused:
        _sum_parts(y2, x2, part, net.part_stride, n)


cdef void _forward_rows(Net* net, const int* tokens, Py_ssize_t n0, int64_t pos0, Py_ssize_t M) noexcept nogil:
    """Encode tokens[:M] at positions pos0..pos0+M-1 by walking the decode table, appending their
    keys and values to the cache (which holds n0 rows before); the last row's logits (V,) land in
    the table's last output slot.
    Main thread; the helpers share the matrix products (by output columns, so each streams a share
    of the weights) and the attention heads."""
    cdef Py_ssize_t r = 0, m, c, Mr, Kd, Nd, used
    cdef const int64_t* row
    cdef const float* xin
    cdef float* out
    cdef float* scratch = net.scratch
    cdef float* wte
    cdef float* wpe
    cdef float v
    if net.half > 0 and net.batch:
        for m in range(M):
            fc_rope_tables(net.rope_cos + m * net.half, net.rope_sin + m * net.half, net.inv_freq, net.half,
                           net.rpos[m], 1)
    elif net.half > 0:
        fc_rope_tables(net.rope_cos, net.rope_sin, net.inv_freq, net.half, pos0, M)
    net.n0 = n0
    net.pos0 = pos0
    net.toks = tokens
    while r < net.R:
        row = net.table + r * NCOL
        r += 1
        Mr = M if row[ROWS] == ROWS_ALL or net.batch else 1  # a batch needs every stream's logits
        Kd = row[K]
        Nd = row[N]
        out = scratch + row[OUT]
        xin = scratch + row[IN] + ((M - 1) * Kd if row[ROWS] == ROWS_LAST and not net.batch else 0)
        if row[OPC] == OP_EMBED:
            for m in range(M):
                for c in range(Nd):
                    v = net.params[row[W] + tokens[m] * Nd + c]
                    if row[W2] >= 0:
                        v = v + net.params[row[W2] + ((net.rpos[m] if net.batch else pos0 + m)) * Nd + c]
                    out[m * Nd + c] = v
        elif row[OPC] == OP_RMSNORM or row[OPC] == OP_LAYERNORM:
            _norm(<int>row[OPC], out, xin, net.params + row[W], Mr, Nd, <float>net.eps[r - 1])
        elif row[OPC] == OP_MATMUL_T:
            # weights stored [out, in] (a tied head reading wte): packed transposed, or dot products
            if net.packed != NULL:
                _product(net, 0, out, xin, NULL, net.packed + net.poff[r - 1], Mr, Kd, Nd, 0, Nd)
            else:
                fc_matmul_t(out, xin, net.params + row[W], Mr, Kd, Nd, Nd)
        elif row[OPC] == OP_MATMUL and _on_main(row, Mr):
            # the head's one-row product (the logits): main thread, not worth a stage's handshake
            _product(net, 0, out, xin, net.params + row[W], net.packed + net.poff[r - 1] if net.packed != NULL else NULL,
                     1, Kd, Nd, 0, Nd)  # task 0's scratch: no stage is running
        elif row[OPC] == OP_MATMUL or row[OPC] == OP_ATTENTION:
            used = net.lead.rows_used if net.lead.published else _describe(net, r - 1, M)
            r += used - 1
            _run_stage(net, r, M)
        elif row[OPC] == OP_RESIDUAL:
            for c in range(Mr * Nd):
                out[c] = xin[c] + scratch[row[IN2] + c]
        elif row[OPC] == OP_RELU2:
            for c in range(Mr * Nd):
                v = xin[c] if xin[c] > 0 else 0.0
                out[c] = v * v
        elif row[OPC] == OP_GELU:
            for c in range(Mr * Nd):
                out[c] = fc_gelu(xin[c])


cdef inline Py_ssize_t _refill(int* tokens, Py_ssize_t n_cache, Py_ssize_t S, int tok) noexcept nogil:
    """The refill rule of a full learned-position cache (KVCache.advance in fastchar/sampler.py):
    keep the newest S//2 - 1 of the n_cache tokens, then tok, moved to the front of tokens, to be
    re-encoded from position 0. Returns how many tokens that is (the cache's new length)."""
    cdef Py_ssize_t j, n_keep = S // 2 - 1 if S // 2 - 1 > 0 else 0
    for j in range(n_keep):
        tokens[j] = tokens[n_cache - n_keep + j]
    tokens[n_keep] = tok
    return n_keep + 1


cdef int _team_size(Py_ssize_t C, Py_ssize_t steps):
    """Threads for one call: OpenMP's count, at most max(2, C // 32); 1 while the solo spell after
    slow waits lasts (see SOLO_STEPS; the call runs steps of them, at least one)."""
    global _solo_left
    cdef int nt = fc_max_threads()
    nt = min(nt, max(2, C // 32))
    if nt < 1:
        nt = 1
    if _solo_left > 0:
        _solo_left -= steps if steps > 1 else 1
        nt = 1
    return nt


cdef void _after_call(bint solo, int nt, double t_end):
    """After a call: a descheduled helper (a slow end of the parallel region, or a stage that waited)
    starts a solo spell of one-thread calls, twice as long as the last; a clean team call resets it."""
    global _solo_left, _solo_next, _stalls
    if nt > 1 and fc_now() - t_end > SLOW_WAIT:
        solo = True  # the end of the parallel region waited for a descheduled helper
    if solo:
        _stalls += 1
        _solo_left = _solo_next
        _solo_next = min(2 * _solo_next, MAX_SOLO_STEPS)
    elif nt > 1:
        _solo_next = SOLO_STEPS


cdef float* _setup_net(Net* net, fc_team* team, const float* params, const int64_t* table, const double* eps,
                       const double* inv_freq, Py_ssize_t half, float* scratch, Py_ssize_t R, Py_ssize_t S,
                       Py_ssize_t C, Py_ssize_t n_head, int nt, Py_ssize_t rope_rows) except NULL:
    """What both drivers' Net share: the model, an idle team, and the per-call scratch block (attention
    scores (nt, S), the cos and sin rows (rope_rows, HS/2), the main thread's Lead, then the fused
    stages' parts (2, NPART, rope_rows, C) and a helper's own rows (2, rope_rows, C)); returns the
    block, which the caller frees."""
    team.next = 0
    team.limit = 0
    team.done = 0
    team.taken = 0
    team.quit = 0
    net.params, net.table, net.eps, net.inv_freq, net.scratch = params, table, eps, inv_freq, scratch
    net.R, net.S, net.C, net.half, net.n_head = R, S, C, half, n_head
    cdef size_t head = (nt * S + 2 * rope_rows * half + 16) // 16 * 16  # whole 64-byte lines
    cdef size_t lead = (sizeof(Lead) + 63) // 64 * 16  # floats
    net.part_stride = (rope_rows * C + 15) // 16 * 16
    cdef float* block = <float*>aligned_alloc(64, (head + lead + (2 * NPART + 2) * net.part_stride) * sizeof(float))
    if block == NULL:
        raise MemoryError()
    net.scores = block
    net.rope_cos = block + nt * S
    net.rope_sin = net.rope_cos + rope_rows * half
    net.lead = <Lead*>(block + head)
    net.part_base = block + head + lead
    net.part = net.part_base
    net.mine = net.part_base + 2 * NPART * net.part_stride
    net.fuse = _can_fuse(C, n_head)
    net.team = team
    net.ntask = nt
    net.prelude = False
    net.batch = False
    memset(net.lead, 0, sizeof(Lead))
    return block


cdef object _use_packed(Net* net, object packed, const int64_t[:, ::1] table, Py_ssize_t ntask, Py_ssize_t rows):
    """Point net at pack_weights' (packed, offsets, precision) if given and not empty, else at none;
    for bf16, also at each task's scratch for its input rows (returned: keep it for the call)."""
    import numpy as np

    cdef const float[::1] pk
    cdef const int64_t[::1] po
    cdef uint32_t[::1] xw
    cdef Py_ssize_t R = table.shape[0], r, kmax = 1
    net.packed = NULL
    net.poff = NULL
    net.bf16 = False
    net.xw = NULL
    net.xw_stride = 0
    net.lookup = NULL
    net.looked_up = False
    if packed is None:
        return None
    pk, po, precision, lookup = packed
    if pk.shape[0] == 0:
        return None
    if po.shape[0] != R or precision not in ("fp32", "bf16"):
        raise ValueError("packed weights: pack_weights(params, table, precision) of this table")
    net.packed = &pk[0]
    net.poff = &po[0]
    cdef const float[:, ::1] lk = lookup
    if lk.shape[0] > 0:
        if lk.shape[1] != 3 * table[ROW_LOOKUP, N]:
            raise ValueError("packed weights: the lookup rows must be 3C wide")
        net.lookup = &lk[0, 0]
    if precision == "fp32":
        return None
    for r in range(R):
        kmax = max(kmax, table[r, K])
    net.bf16 = True
    net.xw_stride = (rows * ((kmax + 1) // 2) + 15) // 16 * 16
    words = np.zeros(ntask * net.xw_stride, np.uint32)
    xw = words
    net.xw = &xw[0]
    return words


def pack_weights(const float[::1] params, const int64_t[:, ::1] table, str precision="fp32", object eps=None,
                 Py_ssize_t vocab=0) -> tuple:
    """The decode table's matrix products' weights packed for the vector products: (packed (n,)
    float32 -- bf16 pairs in its bits for precision "bf16" --, offsets (R,) int64, -1 for rows
    without a product, precision, lookup), or empty arrays when the path in use has none (the generic
    path, or "bf16" without AVX512_BF16 on the avx512 path): the loops then read params in fp32.
    lookup (vocab, 3C) float32: the first layer's q, k, v (before rotary positions) of each token, the
    values the loop's product would compute (first_layer_lookup), when eps (the table's, (R,)) and
    vocab are given and the table allows it; else (0, 0).
    Pack once per generation and keep as DecodeState.packed (fastchar.sampler.decode_state); the
    weights are read as they are now."""
    import numpy as np

    cdef Py_ssize_t R = table.shape[0], r, total = 0, Kd, Nd
    cdef bint bf16 = precision == "bf16"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if not (fc_packed_bf16_ok() if bf16 else fc_packed_ok()):
        return np.zeros(0, np.float32), np.zeros(0, np.int64), precision, np.zeros((0, 0), np.float32)
    offsets = np.full(R, -1, np.int64)
    for r in range(R):
        if table[r, OPC] == OP_MATMUL or table[r, OPC] == OP_ATTENTION or table[r, OPC] == OP_MATMUL_T:
            Kd = table[r, K]
            Nd = 3 * table[r, N] if table[r, OPC] == OP_ATTENTION else table[r, N]
            if table[r, W] < 0 or table[r, W] + Kd * Nd > params.shape[0]:
                raise ValueError(f"decode table row {r} points outside params")
            offsets[r] = total
            total += fc_packed_size_bf16(Kd, Nd) if bf16 else fc_packed_size(Kd, Nd)
    packed = np.zeros(total + 16, np.float32)  # + 16: the aligned start below
    cdef float[::1] pk = packed
    cdef Py_ssize_t shift = (-(<size_t>&pk[0] // 4)) % 16  # 64-byte lines: one panel row per line
    packed = packed[shift : shift + total]
    pk = packed
    cdef int64_t[::1] po = offsets
    cdef const float[::1] src
    for r in range(R):
        if po[r] >= 0:
            Kd = table[r, K]
            Nd = 3 * table[r, N] if table[r, OPC] == OP_ATTENTION else table[r, N]
            if table[r, OPC] == OP_MATMUL_T:  # stored [out, in]: pack its transpose
                src = np.ascontiguousarray(np.asarray(params[table[r, W] : table[r, W] + Kd * Nd]).reshape(Nd, Kd).T).ravel()
            else:
                src = params[table[r, W] : table[r, W] + Kd * Nd]
            if bf16:
                fc_pack16_bf16(<uint32_t*>&pk[po[r]], &src[0], Kd, Nd, Nd)
            else:
                fc_pack16(&pk[po[r]], &src[0], Kd, Nd, Nd)
    lookup = np.zeros((0, 0), np.float32)
    if eps is not None and _lookup_on and first_layer_lookup(table, vocab):
        lookup = _first_layer_rows(params, table, eps, packed, offsets, precision, vocab)
    return packed, offsets, precision, lookup


# The first layer's q, k, v by table lookup. With rotary positions (no position embedding) the rows the
# first attention multiplies, norm(wte[token]), depend on the token only: the model's V tokens give V
# rows of q, k and v, computed once per generation with the loop's own norm and product (the same
# values, bit for bit: each is one chain over k whatever the rows or columns). The loop then copies a
# row instead of reading the first qkv product's weights (C x 3C): a table of V x 3C is smaller when
# V <= C (65 x 384 floats against 128 x 384 at the base model: 6 % of a character's weights).
LOOKUP_ROW = ROW_LOOKUP  # (for fastchar.sampler.describe_decode)
cdef bint _lookup_on = True


def set_first_layer_lookup(bint on) -> None:
    """Whether pack_weights builds the first layer's lookup (for tests and comparisons; default on)."""
    global _lookup_on
    _lookup_on = on


def first_layer_lookup(const int64_t[:, ::1] table, Py_ssize_t vocab) -> bool:
    """Whether a table's first attention can take q, k, v from a table of vocab rows: embedding
    without positions, then a norm of it, then the first layer's attention on the norm; vocab <= C."""
    if table.shape[1] != NCOL or table.shape[0] <= ROW_LOOKUP or vocab <= 0:
        return False
    cdef const int64_t* e = &table[0, 0]
    cdef const int64_t* n = &table[1, 0]
    cdef const int64_t* a = &table[ROW_LOOKUP, 0]
    return (e[OPC] == OP_EMBED and e[W2] < 0 and (n[OPC] == OP_RMSNORM or n[OPC] == OP_LAYERNORM)
            and n[IN] == e[OUT] and n[N] == e[N] and a[OPC] == OP_ATTENTION and a[IN] == n[OUT] and a[LAYER] == 0
            and a[K] == e[N] and a[N] == e[N] and vocab <= e[N])


cdef object _first_layer_rows(const float[::1] params, const int64_t[:, ::1] table, object eps, object packed,
                              object offsets, str precision, Py_ssize_t V):
    """lookup (V, 3C): norm(wte[t]) @ Wqkv for each token t, by the loop's own functions."""
    import numpy as np

    cdef Py_ssize_t C = table[0, N], t
    cdef const int64_t* n = &table[1, 0]
    cdef double e = eps[1]
    rows = np.zeros((V, 3 * C), np.float32)
    normed = np.zeros((V, C), np.float32)
    xw = np.zeros(V * ((C + 1) // 2) + 16, np.uint32)
    cdef float[:, ::1] y = rows
    cdef float[:, ::1] h = normed
    cdef uint32_t[::1] w = xw
    cdef const float[::1] pk = packed
    cdef Py_ssize_t at = offsets[ROW_LOOKUP]
    if table[0, W] + V * C > params.shape[0]:
        raise ValueError("the embedding has fewer rows than the vocabulary")
    for t in range(V):
        _norm(<int>n[OPC], &h[t, 0], &params[table[0, W] + t * C], &params[n[W]], 1, C, <float>e)
    if precision == "bf16":
        fc_matmul_packed_bf16(&y[0, 0], &h[0, 0], C, <const uint32_t*>&pk[at], V, C, 0, C, 3 * C, 0, 3 * C, &w[0])
    else:
        fc_matmul_packed(&y[0, 0], &h[0, 0], C, &pk[at], V, C, 0, C, 3 * C, 0, 3 * C)
    return rows


def token_probs(const float[::1] logits, double temperature, Py_ssize_t top_k, double top_p) -> object:
    """The compiled sampler's distribution (V,) float64 (fc_token_probs; for the parity tests).

    top_k <= 0: no top-k; top_p >= 1: no top-p; temperature > 0.
    """
    import numpy as np

    cdef Py_ssize_t V = logits.shape[0]
    probs = np.zeros(V, np.float64)
    tmp = np.zeros(V, np.float64)
    order = np.zeros(V, np.int32)
    cdef double[::1] p = probs
    cdef double[::1] t = tmp
    cdef int32_t[::1] o = order
    fc_token_probs(&logits[0], V, temperature, top_k, top_p, &p[0], &t[0], &o[0])
    return probs


cdef struct Batch:
    # one generate_batch call; see there. state is updated in place.
    Net* net
    int* out  # (B, N)
    int* tokens  # (B, S)
    int64_t* state  # (B, 2): rows in each cache, each stream's next position
    const int64_t* n_feed  # (B,)
    const int32_t* active  # (B,)
    float* logits  # (B, V): each stream's logits of its next draw, kept between calls
    float* logits_out  # (B, N, V) or NULL
    const double* uniforms  # (B, N) or NULL (no stream draws)
    const double* temperature  # (B,) each stream's sampling options
    const int64_t* top_k
    const double* top_p
    double* work  # (ntask, 3V) each sampling task's scratch
    int32_t* order  # (ntask, V)
    int* rtok  # (B,) the batch rows' tokens
    int64_t* rows  # (4, B): stream, slot, cache rows after the append, position
    int64_t* draw  # (B,) the streams drawing now
    Py_ssize_t ndraw, i  # how many, and which draw (column of out)
    Py_ssize_t V, N, B, logits_at
    bint advance_last
    bint slides
    double t_start  # when _run_batch started
    double t_split  # when the first alone_steps steps were drawn (a prefix probe)
    double t_end  # when _run_batch finished (the helpers may still have to notice)
    Py_ssize_t alone_steps  # a prefix probe: steps run on the main thread alone first (net.alone), else 0
    const int32_t* masks  # (ngroups, B): the streams of each group (run one group after another)
    Py_ssize_t ngroups


cdef void _sample_rows(Batch* job, Py_ssize_t task, Py_ssize_t d0, Py_ssize_t d1) noexcept nogil:
    """Draw column job.i of out for the streams job.draw[d0:d1], with task's scratch (fc_sample: each
    stream's value is the same whichever task draws it)."""
    cdef Py_ssize_t d, b, j, V = job.V, N = job.N, i = job.i
    cdef double temperature
    for d in range(d0, d1):
        b = job.draw[d]
        if job.logits_out != NULL:
            for j in range(V):
                job.logits_out[(b * N + i) * V + j] = job.logits[b * V + j]
        temperature = job.temperature[b]
        job.out[b * N + i] = <int>fc_sample(job.logits + b * V, V, temperature, job.top_k[b], job.top_p[b],
                                            job.uniforms[b * N + i] if temperature > 0 else 0.0,
                                            job.work + task * 3 * V, job.order + task * V)


cdef void _encode_one(Batch* job, Py_ssize_t b, const int* toks, Py_ssize_t n0, int64_t pos0, Py_ssize_t M) noexcept nogil:
    """Stream b alone: encode toks[:M] at positions pos0.. into its cache (a prompt or a refill); its
    next logits are the last row's."""
    cdef Net* net = job.net
    cdef Py_ssize_t j, V = job.V
    net.batch = False
    net.kcache = net.kall + b * net.L * net.C * net.S * _kv_bytes(net)
    net.vcache = net.vall + b * net.L * net.C * net.S * _kv_bytes(net)
    _forward_rows(net, toks, n0, pos0, M)
    for j in range(V):
        job.logits[b * V + j] = net.scratch[job.logits_at + j]


cdef void _run_batch(Batch* job) noexcept nogil:
    """The body of generate_batch (main thread): its groups one after another; tells the helpers to
    stop when done."""
    cdef Py_ssize_t g
    job.t_start = fc_now()
    for g in range(job.ngroups):
        job.active = job.masks + g * job.B
        _run_group(job)
    job.t_end = fc_now()
    fc_set_quit(job.net.team)


cdef void _run_group(Batch* job) noexcept nogil:
    """The streams job.active of generate_batch: encode the prompts, then draw and advance."""
    cdef Net* net = job.net
    cdef Py_ssize_t S = net.S, V = job.V, N = job.N, B = job.B
    cdef Py_ssize_t i, j, b, m, M, nc
    cdef int tok
    cdef int* pt
    cdef int64_t* rstream = job.rows
    cdef int64_t* rslot = job.rows + B
    cdef int64_t* rn = job.rows + 2 * B
    cdef int64_t* rpos = job.rows + 3 * B
    net.rstream, net.rslot, net.rn, net.rpos = rstream, rslot, rn, rpos
    net.job = job
    for b in range(B):
        if job.n_feed[b] > 0 and job.active[b]:
            _encode_one(job, b, job.tokens + b * S + job.state[2 * b], job.state[2 * b], job.state[2 * b + 1], job.n_feed[b])
            job.state[2 * b] += job.n_feed[b]
            job.state[2 * b + 1] += job.n_feed[b]
    job.ndraw = 0
    for b in range(B):
        if job.active[b]:
            job.draw[job.ndraw] = b
            job.ndraw += 1
    for i in range(N):
        job.i = i
        if i == job.alone_steps and job.alone_steps > 0:  # a prefix probe: the rest on the team
            job.t_split = fc_now()
            net.lead.alone = False
        if job.ndraw < SAMPLE_STAGE_ROWS:
            _sample_rows(job, 0, 0, job.ndraw)
        else:
            net.kind = STAGE_SAMPLE
            net.nt = net.ntask
            _stage(net)
        if i + 1 == N and not job.advance_last:
            break
        M = 0
        for b in range(B):
            if not job.active[b]:
                continue
            tok = job.out[b * N + i]
            pt = job.tokens + b * S
            nc = job.state[2 * b]
            if nc >= S and not job.slides:
                # learned positions, full: the refill rule, re-encoded from position 0
                nc = _refill(pt, nc, S, tok)
                _encode_one(job, b, pt, 0, 0, nc)
                job.state[2 * b] = nc
                job.state[2 * b + 1] = nc
                continue
            if nc < S:
                pt[nc] = tok
            job.rtok[M] = tok
            rstream[M] = b
            rslot[M] = job.state[2 * b + 1] % S
            rn[M] = nc + 1 if nc < S else S
            rpos[M] = job.state[2 * b + 1]
            job.state[2 * b] = rn[M]
            job.state[2 * b + 1] += 1
            M += 1
        if M > 0:
            net.batch = True
            _forward_rows(net, job.rtok, 0, 0, M)
            for m in range(M):
                for j in range(V):
                    job.logits[rstream[m] * V + j] = net.scratch[job.logits_at + m * V + j]


def generate_batch(object st, int[:, ::1] out, const double[:, ::1] uniforms, bint advance_last,
                   float[:, :, ::1] logits_out, const int32_t[::1] groups=None) -> None:
    """Sample out.shape[1] tokens for each running stream of st (fastchar.sampler.DecodeState),
    advancing every running stream's cache together after each draw (after the last only if
    advance_last); one stream is the batch of one row.

    Stream b first encodes tokens[b, n_cache:n_cache+n_feed[b]] (its prompt; 0 on later calls), then
    draws with its own temperature, top_k and top_p. out (B, N) int32; uniforms (B, N) float64, row b
    from stream b's own generator (read for the streams whose temperature is > 0); logits_out
    (B, N, V) float32 receives each draw's logits, or (B, 0, V) to skip. st's state, tokens, caches
    and logits are updated. Runs on OpenMP's thread count (fastchar.set_threads), at most
    max(2, C // 32); the result does not depend on it nor on the other streams.

    groups (B,) int32, if given: stream b's group (0, 1, ...; fastchar.sampler.cache_groups). The
    groups run one after another, all their steps each; with two threads or more, side by side
    instead, each group on one thread with its own scratch (no handshake between the threads at
    every product: the threads take the next group as they finish one).
    """
    global _stages_run, _early_run
    cdef const float[::1] params = st.params
    cdef const int64_t[:, ::1] table = st.table
    cdef const double[::1] eps = st.eps
    cdef const double[::1] inv_freq = st.inv_freq
    cdef int[:, ::1] tokens = st.tokens
    cdef int64_t[:, ::1] state = st.state
    cdef const int64_t[::1] n_feed = st.n_feed
    cdef const int32_t[::1] active = st.active
    cdef Py_ssize_t B, L, C, S
    cdef bint kv16
    kbytes, vbytes, kv16, B, L, C, S = _caches(st.kcache, st.vcache, st.n_head)
    cdef unsigned char[::1] kall = kbytes
    cdef unsigned char[::1] vall = vbytes
    cdef float[::1] scratch = st.scratch
    cdef float[:, ::1] logits = st.logits
    cdef const double[::1] row_t = st.temperature
    cdef const int64_t[::1] row_k = st.top_k
    cdef const double[::1] row_p = st.top_p
    cdef Py_ssize_t n_head = st.n_head, logits_at = st.logits_at
    cdef bint slides = st.slides
    cdef bint went_solo
    cdef Py_ssize_t V = logits.shape[1], R = table.shape[0], Nn = out.shape[1], rows_cap = S if S > B else B
    cdef Py_ssize_t r, b, fed = 0
    cdef int nt
    cdef bint draws = False
    if table.shape[1] != NCOL:
        raise ValueError(f"table must have {NCOL} columns (fastchar.graph.decode_table)")
    for r in range(R):
        if (table[r, OUT] + rows_cap * table[r, N] > scratch.shape[0] or table[r, W] >= params.shape[0]
                or table[r, LAYER] >= L):
            raise ValueError(f"decode table row {r} points outside scratch, params or the cache")
    if (out.shape[0] != B or tokens.shape[0] != B or tokens.shape[1] < S or state.shape[0] != B
            or n_feed.shape[0] != B or active.shape[0] != B or logits.shape[0] != B
            or row_t.shape[0] != B or row_k.shape[0] != B or row_p.shape[0] != B):
        raise ValueError("out, tokens, state, n_feed, active, logits, the caches and the options need one row "
                         "per stream")
    if logits_at + rows_cap * V > scratch.shape[0]:
        raise ValueError("scratch is too small")
    for b in range(B):
        if state[b, 0] + n_feed[b] > S or (active[b] and state[b, 0] + n_feed[b] == 0 and Nn > 0):
            raise ValueError(f"stream {b}: need 0 < n_cache + n_feed <= S={S}")
        draws = draws or (active[b] and row_t[b] > 0)
        if active[b]:
            fed += n_feed[b]
    if (draws and (uniforms.shape[0] != B or uniforms.shape[1] < Nn)) or (
            logits_out.shape[1] > 0 and (logits_out.shape[0] != B or logits_out.shape[1] < Nn)):
        raise ValueError("uniforms or logits_out is too small")
    if inv_freq.shape[0] > 0 and 2 * inv_freq.shape[0] * n_head != C:
        raise ValueError("inv_freq must have HS/2 entries")
    if B == 0 or (Nn == 0 and fed == 0):
        return
    import numpy as np

    cdef Py_ssize_t ngroups = 1
    cdef int32_t[:, ::1] masks
    if groups is not None:
        if groups.shape[0] != B:
            raise ValueError("groups needs one entry per stream")
        for b in range(B):
            if active[b] and not 0 <= groups[b] < B:
                raise ValueError(f"stream {b}: group {groups[b]} is not in 0..{B - 1}")
            if active[b]:
                ngroups = max(ngroups, groups[b] + 1)
        masks = np.zeros((ngroups, B), np.int32)
        for b in range(B):
            if active[b]:
                masks[groups[b], b] = 1
    else:
        masks = np.asarray(active, np.int32).reshape(1, B).copy()

    nt = _team_size(C, Nn)
    cdef Py_ssize_t running = 0
    for b in range(B):
        running += active[b] != 0
    cdef bint one_row = nt > 1 and running == 1
    if one_row:
        _measure_for(<size_t>&params[0])
    cdef bint timed = one_row and fed == 0 and Nn >= 8  # only draws: its time per character is comparable
    cdef bint probe = timed and not _fixed and _probe_left <= 0
    cdef bint prefix = probe and _prefix_due(Nn)
    cdef Py_ssize_t alone
    if probe and _probe_left == 0:  # a probe starts: the other count's old times are stale
        _per_char[not _one_thread][0] = _per_char[not _one_thread][1] = 0.0
    cdef double t_call = fc_now()
    if one_row and _one_thread != (probe and not prefix):  # one thread: the choice, or a probe of it
        nt = 1
    if one_row:
        _calls[nt > 1] += 1
        alone = Nn if nt == 1 else PROBE_STEPS if prefix else 0
        _chars[0] += alone
        _chars[1] += Nn - alone
    rtok = np.zeros(B, np.int32)
    rows = np.zeros(5 * B, np.int64)
    work = np.zeros(nt * 3 * V, np.float64)
    order = np.zeros(nt * V, np.int32)
    cdef int[::1] rtok_v = rtok
    cdef int64_t[::1] rows_v = rows
    cdef double[::1] work_v = work
    cdef int32_t[::1] order_v = order
    cdef fc_team team
    cdef Net net
    cdef Batch job
    cdef Batch* jp = &job
    words = _use_packed(&net, st.packed, table, nt, rows_cap)  # noqa: F841 (kept alive for the call)
    cdef float* block = _setup_net(&net, &team, &params[0], &table[0, 0], &eps[0],
                                   &inv_freq[0] if inv_freq.shape[0] > 0 else NULL, inv_freq.shape[0],
                                   &scratch[0], R, S, C, n_head, nt, rows_cap)
    net.L = L
    net.kall = <char*>&kall[0]
    net.vall = <char*>&vall[0]
    net.kv16 = kv16
    net.kcache = net.kall
    net.vcache = net.vall
    job.net = &net
    job.out = &out[0, 0] if Nn > 0 else NULL
    job.tokens = &tokens[0, 0]
    job.state = &state[0, 0]
    job.n_feed = &n_feed[0]
    job.masks = &masks[0, 0]
    job.ngroups = ngroups
    job.logits = &logits[0, 0]
    job.logits_out = &logits_out[0, 0, 0] if logits_out.shape[1] > 0 else NULL
    job.uniforms = &uniforms[0, 0] if draws and Nn > 0 else NULL
    job.temperature, job.top_k, job.top_p = &row_t[0], &row_k[0], &row_p[0]
    job.work = &work_v[0]
    job.order = &order_v[0]
    job.rtok = &rtok_v[0]
    job.rows = &rows_v[0]
    job.draw = &rows_v[4 * B]
    job.V, job.logits_at = V, logits_at
    job.N, job.B, job.advance_last, job.slides = Nn, B, advance_last, slides
    job.alone_steps = PROBE_STEPS if prefix else 0
    net.lead.alone = prefix
    if ngroups > 1 and nt > 1:
        free(block)
        _side_by_side(jp, st, table, masks, nt, rows_cap)
        return
    if nt > 1:
        with nogil, parallel(num_threads=nt):
            if fc_thread_num() == 0:
                _run_batch(jp)
            else:
                _helper(jp.net)
    else:
        with nogil:
            _run_batch(jp)
    _stages_run += net.lead.stages
    _early_run += net.lead.early
    went_solo = net.lead.solo
    free(block)  # it holds net.lead: read above, never after
    _after_call(went_solo, nt, job.t_end)
    if timed and not went_solo and prefix:  # (a call that went solo half way measured neither)
        _chose_prefix((job.t_split - job.t_start) / PROBE_STEPS, (job.t_end - job.t_split) / (Nn - PROBE_STEPS))
    elif timed and not went_solo:
        _chose(nt > 1, (fc_now() - t_call) / Nn, probe)


cdef void _keep(bint team, double per_char):
    _per_char[team][1] = _per_char[team][0]
    _per_char[team][0] = per_char


cdef void _decide():
    """The end of a probe: keep the count with the fewer seconds a character; the next probe comes
    twice as many calls later if the count stays."""
    global _probe_left, _one_thread, _probe_every
    cdef bint one
    if _best(0) > 0.0 and _best(1) > 0.0:
        one = _best(0) < _best(1)
        _probe_every = PROBE_CALLS if one != _one_thread else min(2 * _probe_every, MAX_PROBE_CALLS)
        _one_thread = one
    _probe_left = _probe_every


cdef void _chose_prefix(double alone, double team):
    """After a team call that probed one thread on its first PROBE_STEPS characters: keep both parts'
    seconds a character and decide."""
    _keep(False, alone)
    _keep(True, team)
    _decide()


cdef void _chose(bint team, double per_char, bint probe):
    """After a timed one-row call: keep its time per character; at the end of a probe keep the faster count."""
    global _probe_left
    _keep(team, per_char)
    _probe_left -= 1
    if probe and _probe_left <= -PROBE_LEN:
        _decide()


cdef void _side_by_side(Batch* job, object st, const int64_t[:, ::1] table, const int32_t[:, ::1] masks, int nt,
                        Py_ssize_t rows_cap) except *:
    """generate_batch's groups (masks (ngroups, B)) on nt threads side by side: each thread takes the
    next group and runs all its steps alone (a Net of one task, its own scratch), as job would."""
    global _stages_run
    import numpy as np

    cdef const float[::1] params = st.params
    cdef const double[::1] eps = st.eps
    cdef const double[::1] inv_freq = st.inv_freq
    cdef Py_ssize_t B = job.B, V = job.V, ngroups = masks.shape[0], g, t
    cdef Py_ssize_t stride = (st.scratch.shape[0] + 15) // 16 * 16
    bufs = st.side.get(nt)  # made once per DecodeState and thread count (first touches cost)
    if bufs is None:
        raw = np.zeros(nt * stride + 16, np.float32)
        # rows padded by 128 bytes: no line is written by two threads
        bufs = st.side[nt] = (raw[(-raw.ctypes.data % 64) // 4 :], np.zeros((nt, B + 32), np.int32),
                              np.zeros((nt, 5 * B + 16), np.int64), np.zeros((nt, 3 * V + 16), np.float64),
                              np.zeros((nt, V + 32), np.int32))
    cdef float[::1] scratch = bufs[0]  # 64-byte lines, like st.scratch
    cdef int[:, ::1] rtok = bufs[1]
    cdef int64_t[:, ::1] rows = bufs[2]
    cdef double[:, ::1] work = bufs[3]
    cdef int32_t[:, ::1] order = bufs[4]
    # each thread's Net, team and Batch on lines of their own (their fields change at every product)
    cdef size_t pad = (sizeof(Net) + sizeof(fc_team) + sizeof(Batch) + 3 * 128) // 128 * 128
    cdef char* own = <char*>aligned_alloc(128, nt * pad)
    cdef Net* net
    cdef fc_team* team
    cdef Batch* mine
    cdef float** blocks = <float**>calloc(nt, sizeof(float*))
    keep = []
    try:
        if own == NULL or blocks == NULL:
            raise MemoryError()
        memset(own, 0, nt * pad)
        for t in range(nt):
            net, team, mine = _own(own, pad, t)
            keep.append(_use_packed(net, st.packed, table, 1, rows_cap))
            blocks[t] = _setup_net(net, team, &params[0], &table[0, 0], &eps[0],
                                   &inv_freq[0] if inv_freq.shape[0] > 0 else NULL, inv_freq.shape[0],
                                   &scratch[t * stride], table.shape[0], job.net.S, job.net.C, job.net.n_head, 1,
                                   rows_cap)
            net.L, net.kall, net.vall, net.kv16 = job.net.L, job.net.kall, job.net.vall, job.net.kv16
            net.kcache, net.vcache = job.net.kall, job.net.vall
            net.lead.solo = True
            mine[0] = job[0]
            mine.net = net
            mine.work, mine.order = &work[t, 0], &order[t, 0]
            mine.rtok, mine.rows, mine.draw = &rtok[t, 0], &rows[t, 0], &rows[t, 4 * B]
            mine.ngroups = 1
        with nogil:
            for g in prange(ngroups, num_threads=nt, schedule="dynamic"):
                mine = _own(own, pad, threadid())[2]
                mine.masks = &masks[g, 0]
                _run_batch(mine)
    finally:
        if blocks != NULL:
            for t in range(nt):
                if own != NULL and blocks[t] != NULL:  # (the Lead lives in the block)
                    _stages_run += _own(own, pad, t)[0].lead.stages
                free(blocks[t])
        free(own)
        free(blocks)


cdef inline (Net*, fc_team*, Batch*) _own(char* own, size_t pad, Py_ssize_t t) noexcept nogil:
    """Thread t's Net, team and Batch in _side_by_side's block (pad bytes per thread, each on its
    own 128-byte lines)."""
    cdef char* p = own + t * pad
    cdef size_t a = (sizeof(Net) + 127) // 128 * 128, b = (sizeof(fc_team) + 127) // 128 * 128
    return <Net*>p, <fc_team*>(p + a), <Batch*>(p + a + b)


def matmul_packed(float[:, ::1] y, const float[:, ::1] x, const float[:, ::1] w, Py_ssize_t j0, Py_ssize_t j1,
                  str precision="fp32", Py_ssize_t k0=0, object k1=None) -> None:
    """y[:, j0:j1] = x[:, k0:k1] @ w[k0:k1, j0:j1] through the packing (of all of w) and the packed
    product of the decode loops (for the tests; the other columns of y are left alone). y (M, N),
    x (M, K), w (K, N) float32; k1 None: K; bf16 needs k0 even. Needs packed_available(precision)."""
    import numpy as np

    cdef Py_ssize_t M = x.shape[0], Kd = x.shape[1], Nd = w.shape[1]
    cdef Py_ssize_t kend = Kd if k1 is None else k1
    if not packed_available(precision):
        raise RuntimeError(f"no packed {precision} product on this path (the generic path has none; bf16 needs avx512)")
    if w.shape[0] != Kd or y.shape[0] != M or y.shape[1] != Nd or not 0 <= j0 <= j1 <= Nd or M == 0 or Kd == 0:
        raise ValueError("need y (M, N), x (M, K), w (K, N), 0 <= j0 <= j1 <= N, M, K > 0")
    if not 0 <= k0 < kend <= Kd or (precision == "bf16" and k0 % 2):
        raise ValueError("need 0 <= k0 < k1 <= K (k0 even in bf16)")
    cdef uint32_t[::1] pk
    cdef uint32_t[::1] xw = np.zeros(M * ((Kd + 1) // 2), np.uint32)
    if precision == "bf16":
        pk = np.zeros(fc_packed_size_bf16(Kd, Nd), np.uint32)
        fc_pack16_bf16(&pk[0], &w[0, 0], Kd, Nd, Nd)
        fc_matmul_packed_bf16(&y[0, 0], &x[0, 0], Kd, &pk[0], M, Kd, k0, kend, Nd, j0, j1, &xw[0])
    else:
        pk = np.zeros(fc_packed_size(Kd, Nd), np.uint32)
        fc_pack16(<float*>&pk[0], &w[0, 0], Kd, Nd, Nd)
        fc_matmul_packed(&y[0, 0], &x[0, 0], Kd, <float*>&pk[0], M, Kd, k0, kend, Nd, j0, j1)


def attention_rows(float[:, ::1] out, const float[:, ::1] qkv, object kall, object vall, const int64_t[::1] stream,
                   const int64_t[::1] slot, const int64_t[::1] n, Py_ssize_t layer, Py_ssize_t h0,
                   Py_ssize_t h1) -> None:
    """The batched decode's attention step of heads h0..h1-1 (fc_attention_rows, for the tests and
    benchmarks/bench_decode_attention.py): row m's key and value (from qkv (M, 3C)) go to slot[m] of
    stream[m]'s layer `layer` cache, which then holds its first n[m] slots, and out[m, heads' columns]
    is that row's attention over them. out (M, C); kall (B, L, C, S) and vall (B, L, NH, S, HS) the
    caches, float32 or (bf16 caches, fc_decode.h's layouts) uint16; stream, slot, n (M,) int64."""
    import numpy as np

    if not (isinstance(vall, np.ndarray) and vall.ndim == 5):
        raise ValueError("need vall (B, L, NH, S, C/NH)")
    cdef Py_ssize_t NH = vall.shape[2], M = qkv.shape[0], C = out.shape[1], B, L, S, m
    cdef bint kv16
    kbytes, vbytes, kv16, B, L, _, S = _caches(kall, vall, NH)
    cdef unsigned char[::1] kb = kbytes
    cdef unsigned char[::1] vb = vbytes
    if (M == 0 or qkv.shape[1] != 3 * C or out.shape[0] != M or kall.shape[2] != C or NH == 0 or C % NH
            or not 0 <= layer < L or not 0 <= h0 < h1 <= NH
            or stream.shape[0] != M or slot.shape[0] != M or n.shape[0] != M):
        raise ValueError("need out (M, C), qkv (M, 3C), kall (B, L, C, S), vall (B, L, NH, S, C/NH), stream, slot, "
                         "n (M,), 0 <= layer < L, 0 <= h0 < h1 <= NH")
    for m in range(M):
        if not (0 <= stream[m] < B and 0 <= slot[m] < S and slot[m] < n[m] <= S):
            raise ValueError(f"row {m}: need 0 <= stream < B, 0 <= slot < n <= S")
    cdef float[::1] scores = np.zeros(S, np.float32)
    with nogil:
        fc_attention_rows(&out[0, 0], &qkv[0, 0], &kb[0], &vb[0], &stream[0], &slot[0], &n[0], L, layer, M, C, S, NH,
                          h0, h1, &scores[0], kv16)


def row_stages(const int64_t[:, ::1] table, Py_ssize_t C, Py_ssize_t n_head) -> list:
    """What each row of a decode table runs as in one step of one stream (fastchar.sampler.describe_decode):
    "stage i" (a meeting of the threads), "stage i, fused" (the second product of a fused stage,
    summed over NPART parts of K), or "main thread"."""
    if table.shape[1] != NCOL:
        raise ValueError(f"table must have {NCOL} columns (fastchar.graph.decode_table)")
    cdef Net net
    net.C, net.n_head, net.batch = C, n_head, False
    net.fuse = _can_fuse(C, n_head)
    cdef Py_ssize_t r = 0, R = table.shape[0], stage = 0
    cdef const int64_t* row
    names = []
    while r < R:
        row = &table[r, 0]
        if row[OPC] == OP_ATTENTION or (row[OPC] == OP_MATMUL and not _on_main(row, 1)):
            names.append(f"stage {stage}")
            if (row[OPC] == OP_ATTENTION or row[POST] == POST_RELU2 or row[POST] == POST_GELU) and _fuses(
                    &net, row, &table[r + 1, 0] if r + 1 < R else NULL):
                names.append(f"stage {stage}, fused ({NPART} parts of K)")
                r += 1
            stage += 1
        else:
            names.append("main thread")
        r += 1
    return names


def tile_rows() -> int:
    """The rows of the packed product's full tile on the path in use (8 avx512, 6 avx2, 4 neon, 1
    generic): groups of a multiple of it run no ragged tile (fastchar.sampler.cache_groups)."""
    return fc_decode_tile_rows()


def packed_available(str precision="fp32") -> bool:
    """Whether the decode loops use a packed product of this precision on the path in use."""
    return bool(fc_packed_bf16_ok() if precision == "bf16" else fc_packed_ok())


from fc_isa cimport fc_isa_compiled, fc_isa_cpu, fc_isa_cpu_bf16, fc_isa_set  # noqa: E402


def _set_isa(int code, bint bf16) -> None:
    fc_isa_set(code, bf16)


def _cpu_probe() -> tuple:
    return fc_isa_cpu(), bool(fc_isa_cpu_bf16()), tuple(c for c in range(4) if fc_isa_compiled(c))


from fastchar import isa as _isa  # noqa: E402  (last: the module is complete when the path is set)

_isa.attach(_set_isa, _cpu_probe())
