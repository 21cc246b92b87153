#!/usr/bin/env bash
# The ARM64 build and its correctness tests under emulation, on an x86-64 Debian/Ubuntu machine (root).
#
#   bash scripts/arm64_check.sh [ROOT]        # ROOT: the arm64 root folder (default /var/tmp/fastchar-arm64)
#
# Makes (once) an arm64 Debian root with debootstrap, and runs it through qemu-user-static
# (binfmt_misc), with Python and the aarch64 wheels of NumPy, SciPy and Numba from PyPI. Then copies
# this checkout's files (git ls-files: no build outputs) into it, builds the C extensions there
# (FASTCHAR_REQUIRE_BACKENDS=cython: a failed build is an error), prints `fastchar info` (the neon
# path) and runs the kernel, model-parity and sampler tests: every vector kernel on the NEON path,
# the generic path, and the three backends against the reference. Everything runs 10-50x slower
# than natively: the C build takes minutes, Numba's first compile more; never time it.
# FASTCHAR_ARM64_TESTS overrides the test selection (pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-${FASTCHAR_ARM64_ROOT:-/var/tmp/fastchar-arm64}}
TESTS=${FASTCHAR_ARM64_TESTS:-"tests/test_gemm.py tests/test_attention_avx512.py tests/test_decode_packed.py tests/test_decode_attention.py tests/test_model_parity.py tests/test_sampler.py tests/test_sampler_batch.py tests/test_kernels.py"}
start=$SECONDS

if [ "$(id -u)" != 0 ]; then
    echo "arm64_check: run as root (debootstrap, chroot and binfmt_misc need it)" >&2
    exit 2
fi

# ---- qemu-user-static, binfmt_misc and the arm64 root (about 5 minutes the first time) ----------
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
if [ ! -x "$ROOT/opt/v/bin/python" ]; then
    echo "arm64_check: making the arm64 root in $ROOT"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,python3-dev,gcc,g++ bookworm "$ROOT" >/dev/null
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"  # pip's TLS
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    chroot "$ROOT" /bin/bash -c 'python3 -m venv /opt/v'
fi
# the project's dependencies (pyproject.toml) and what the build and the tests need
deps=$(python3 -c 'import shlex, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))
print(" ".join(map(shlex.quote, p["project"]["dependencies"] + p["build-system"]["requires"])))')
chroot "$ROOT" /bin/bash -c "export PIP_CERT=/etc/ssl/certs/ca-certificates.crt;
    /opt/v/bin/pip install -q $deps pytest hypothesis"
echo "arm64_check: root ready after $((SECONDS - start)) s"

# ---- this checkout into the root, the build and the tests -----------------------------------------
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT
mkdir -p "$ROOT/src/fastchar"  # kept between runs: setuptools rebuilds only what changed (minutes here)
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/src/fastchar"
if [ -n "${FASTCHAR_DATA_DIR:-}" ]; then  # the corpus some tests read
    mkdir -p "$ROOT/src/data" && cp -r "$FASTCHAR_DATA_DIR/." "$ROOT/src/data/"
fi
chroot "$ROOT" /bin/bash -c "
    set -euo pipefail
    cd /src/fastchar
    uname -m
    export FASTCHAR_REQUIRE_BACKENDS=cython
    [ -d /src/data ] && export FASTCHAR_DATA_DIR=/src/data
    t=\$SECONDS
    /opt/v/bin/python setup.py -q build_ext --inplace
    echo \"arm64_check: C build took \$((SECONDS - t)) s\"
    PYTHONPATH=\$PWD /opt/v/bin/python -m fastchar info | grep -E 'backends|kernel path|c build'
    PYTHONPATH=\$PWD /opt/v/bin/python -c 'from fastchar import isa; s = isa.selection(); assert s.path == \"neon\", s; print(s)'
    t=\$SECONDS
    /opt/v/bin/python -m pytest -q -p no:cacheprovider $TESTS
    echo \"arm64_check: tests took \$((SECONDS - t)) s\"
"
echo "arm64_check: done in $((SECONDS - start)) s"
