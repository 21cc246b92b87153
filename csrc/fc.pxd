# The hand-written C of csrc/ (fc_*.h, fc_*.c), declared once for the Cython modules that use it.
from libc.stdint cimport int32_t, int64_t, uint32_t


cdef extern from "fc_math.h" nogil:
    float fc_expf(float x) noexcept
    float fc_erff(float x) noexcept
    float fc_gelu(float x) noexcept
    float fc_gelu_grad(float x) noexcept
    unsigned int fc_dropout_hash(long long i, unsigned int key) noexcept


cdef extern from "fc_sample.h" nogil:
    void fc_token_probs(const float* logits, int64_t V, double temperature, int64_t top_k, double top_p,
                        double* probs, double* tmp, int32_t* order) noexcept
    int64_t fc_sample(const float* logits, int64_t V, double temperature, int64_t top_k, double top_p,
                      double u, double* work, int32_t* order) noexcept


cdef extern from "fc_decode.h" nogil:
    ctypedef struct fc_team:
        long next
        long limit
        long done
        long taken
        int quit
    int fc_max_threads() noexcept
    int fc_thread_num() noexcept
    long fc_claim(fc_team* t) noexcept
    void fc_finish(fc_team* t) noexcept
    void fc_publish(fc_team* t, long n) noexcept
    void fc_taken(fc_team* t) noexcept
    long fc_limit(fc_team* t) noexcept
    int fc_wait_finished(fc_team* t, long target, double slow) noexcept
    int fc_wait_taken(fc_team* t, long target, double slow) noexcept
    void fc_idle(long* spins) noexcept
    void fc_prefetch(const void* p, size_t nbytes) noexcept
    double fc_now() noexcept
    void fc_set_quit(fc_team* t) noexcept
    int fc_quitting(fc_team* t) noexcept
    void fc_matmul(float* y, const float* x, Py_ssize_t ldx, const float* w, Py_ssize_t M, Py_ssize_t K,
                   Py_ssize_t N, Py_ssize_t ldy, Py_ssize_t ldw) noexcept
    Py_ssize_t fc_packed_size(Py_ssize_t K, Py_ssize_t N) noexcept
    void fc_pack16(float* dst, const float* w, Py_ssize_t K, Py_ssize_t N, Py_ssize_t ldw) noexcept
    int fc_packed_ok() noexcept
    int fc_decode_tile_rows() noexcept
    void fc_matmul_packed(float* y, const float* x, Py_ssize_t ldx, const float* wp, Py_ssize_t M, Py_ssize_t K,
                          Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t ldy, Py_ssize_t j0, Py_ssize_t j1) noexcept
    Py_ssize_t fc_packed_size_bf16(Py_ssize_t K, Py_ssize_t N) noexcept
    void fc_pack16_bf16(uint32_t* dst, const float* w, Py_ssize_t K, Py_ssize_t N, Py_ssize_t ldw) noexcept
    int fc_packed_bf16_ok() noexcept
    void fc_matmul_packed_bf16(float* y, const float* x, Py_ssize_t ldx, const uint32_t* wp, Py_ssize_t M,
                               Py_ssize_t K, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t ldy, Py_ssize_t j0,
                               Py_ssize_t j1, uint32_t* xw) noexcept
    int fc_kv16_ok(Py_ssize_t C, Py_ssize_t S, Py_ssize_t n_head) noexcept
    void fc_kv_append(void* kt, void* vt, const float* row, Py_ssize_t C, Py_ssize_t S, Py_ssize_t n_head,
                      Py_ssize_t h0, Py_ssize_t h1, Py_ssize_t slot, int kv16) noexcept
    void fc_attention(float* out, const float* qkv, const void* kt, const void* vt, Py_ssize_t n0,
                      Py_ssize_t M, Py_ssize_t C, Py_ssize_t S, Py_ssize_t n_head, Py_ssize_t h0,
                      Py_ssize_t h1, float* scores, int kv16) noexcept
    void fc_attention_rows(float* out, const float* qkv, void* kall, void* vall, const int64_t* stream,
                           const int64_t* slot, const int64_t* n, Py_ssize_t L, Py_ssize_t layer, Py_ssize_t M,
                           Py_ssize_t C, Py_ssize_t S, Py_ssize_t n_head, Py_ssize_t h0, Py_ssize_t h1,
                           float* scores, int kv16) noexcept
    void fc_rope_tables(float* cos_rows, float* sin_rows, const double* inv_freq, Py_ssize_t half,
                        int64_t pos0, Py_ssize_t M) noexcept
    void fc_rope_heads(float* qkv, const float* cos_rows, const float* sin_rows, Py_ssize_t M, Py_ssize_t C,
                       Py_ssize_t half, Py_ssize_t h0, Py_ssize_t h1) noexcept
    void fc_rmsnorm(float* out, const float* x, const float* g, Py_ssize_t M, Py_ssize_t C, float eps) noexcept
    void fc_layernorm(float* out, const float* x, const float* g, Py_ssize_t M, Py_ssize_t C, float eps) noexcept
    void fc_matmul_t(float* y, const float* x, const float* w, Py_ssize_t M, Py_ssize_t K, Py_ssize_t N,
                     Py_ssize_t ldy) noexcept
