"""fastchar benchmarks: run as `python -m benchmarks.NAME` from the repository root, or `fastchar bench`.

fastchar is imported first, before NumPy, so that its OpenBLAS set-up (fastchar/_blas_env.py)
applies to the benchmarks exactly as it does to the `fastchar` command.
"""

import fastchar  # noqa: F401
