"""Example arguments for every kernel at a given shape: shared by tests/test_kernels.py and
benchmarks/bench_kernels.py, so the kernels are tested and timed on the same inputs.

Each op kind's test case lives in its record (fastchar/ops.py: `OpKind.case`); this module only looks
it up. Backward kernels get non-zero gradients to start from, so accumulation is exercised; saved
buffers (rstd, att, probs) are consistent with their inputs.
"""

from __future__ import annotations

from fastchar.ops import DROPOUT_KEY, DROPOUT_P, make_args

__all__ = ["DROPOUT_KEY", "DROPOUT_P", "make_args"]
