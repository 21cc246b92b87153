# cython: language_level=3
"""fastchar._cykernels_avx2: the Cython kernels of _kernels.pyx, the same source compiled a second time
with AVX2 + FMA (setup.py adds -mavx2 -mfma for this module only, on x86-64 gcc and clang).

GCC vectorises the element-wise loops (relu2, residual, dropout, the norms, rope, GELU) 8 floats wide
here instead of SSE2's 4. fastchar.backends.cython_cpu imports this module only on the avx2 and avx512
paths (a CPU with AVX2 + FMA, FASTCHAR_ISA not forcing generic); everywhere else fastchar._cykernels runs.
"""

include "_kernels.pyx"
