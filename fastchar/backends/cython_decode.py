"""The Cython backend's compiled generation loop: re-exports fastchar._cydecode (built from csrc/_decode.pyx).

One stream is the batched loop with one row: `generate_tokens` is `generate_batch`, the same
signature as fastchar.backends.numba_decode.generate_tokens (a fastchar.sampler.DecodeState). If
the extension was not built, importing this module raises ImportError and fastchar.backends fills
`generate_tokens` with None, so fastchar.sampler falls back to its Python loop.
"""

from __future__ import annotations

try:
    from fastchar._cydecode import generate_batch, kv16_ok
    from fastchar._cydecode import pack_weights as pack_decode_weights
    from fastchar._cydecode import tile_rows as decode_tile_rows
except ImportError as exc:
    raise ImportError(
        "the Cython extension fastchar._cydecode is missing or stale; build it with "
        f"`pip install -e .` (or `python setup.py build_ext --inplace`) ({exc})"
    ) from exc

generate_tokens = generate_batch

__all__ = ["decode_tile_rows", "generate_batch", "generate_tokens", "kv16_ok", "pack_decode_weights"]
