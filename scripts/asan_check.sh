#!/usr/bin/env bash
# The compiled extensions built with AddressSanitizer (and Cython's bounds checks), in a copy of this
# tree, then the kernel, decode and sampler tests on every instruction-set path of this CPU: a read or
# write outside a buffer, or of freed memory, stops the run with ASan's report.
#
#   bash scripts/asan_check.sh [TEST_FILE ...]     (in an environment where fastchar's tests run)
#
# gcc only (it names the runtime to preload). Under ASan, only the files below run (matplotlib, for
# one, aborts when its C++ code loads after the runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/test_gemm.py tests/test_attention_avx512.py tests/test_decode_attention.py
        tests/test_decode_packed.py tests/test_sampler.py tests/test_sampler_batch.py)
fi
copy=$(mktemp -d /tmp/fastchar-asan.XXXXXX)
trap 'rm -rf "$copy"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$copy"
start=$SECONDS
(cd "$copy" && CC="gcc -fsanitize=address -fno-omit-frame-pointer" CFLAGS="-O1 -g" \
    LDSHARED="gcc -fsanitize=address -shared" FASTCHAR_CYTHON_DEBUG=1 python setup.py -q build_ext --inplace \
    2>&1 | { grep -v "performance hint" || true; })
echo "asan_check: build took $((SECONDS - start)) s"
python - "$copy" <<'PY'
import json, sys
info = json.load(open(f"{sys.argv[1]}/fastchar/_build_info.json"))
failed = {name: why for name, why in info["extensions"].items() if why is not None}
assert not failed and info["openmp"] and info["cython_debug"], f"not a full build: {info}"
PY
start=$SECONDS
(cd "$copy" && LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    PYTHONPATH="$copy" python -m pytest -q -p no:cacheprovider --capture=sys "${tests[@]}")  # ASan writes to fd 2
echo "asan_check: tests took $((SECONDS - start)) s"
