"""Build the Cython kernels (fastchar._cykernels), generation loop (fastchar._cydecode) and packed
matrix products (fastchar._gemm) from csrc/.

Everything else lives in pyproject.toml.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTCHAR_CYTHON_DEBUG") == "1"
OPENMP = os.environ.get("FASTCHAR_NO_OPENMP") != "1"

# The kernels never read errno or FP exception flags; without these two, sqrtf (AdamW) and
# compare-selects (relu, max) stay scalar. Neither flag changes any computed value.
compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
if os.environ.get("FASTCHAR_NATIVE") == "1":
    compile_args.append("-march=native")
link_args = []
if OPENMP:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

extension = Extension(
    "fastchar._cykernels",
    ["csrc/_kernels.pyx"],
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

# The compiled generation loop (fastchar.sampler.stream); same flags. Its matrix product picks an
# ISA at load time (target_clones), so it needs no -march flag.
decode_extension = Extension(
    "fastchar._cydecode",
    ["csrc/_decode.pyx"],
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

# Packed bf16 / fp32 matrix products (csrc/gemm_bf16.c) and AVX-512 attention (csrc/attention.c).
# The C files pick AVX512_BF16 / AVX-512F per function with target attributes after a cpuid check,
# so they too need no -march flag.
gemm_extension = Extension(
    "fastchar._gemm",
    ["csrc/_gemm.pyx", "csrc/gemm_bf16.c", "csrc/attention.c"],
    include_dirs=["csrc"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
}

setup(ext_modules=cythonize([extension, decode_extension, gemm_extension], compiler_directives=directives))
