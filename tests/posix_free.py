"""Make this process see `os` as Windows shows it: no fcntl, no O_NOFOLLOW, O_DIRECTORY or O_CLOEXEC,
no dir_fd, no pread/pwrite. `hide()` must run before fastchar (or filelock) is imported.

Used by tests/test_portable.py through `python -c "import posix_free; posix_free.hide(); ..."`.
"""

from __future__ import annotations

import os
import sys

HIDDEN_FLAGS = ("O_NOFOLLOW", "O_DIRECTORY", "O_CLOEXEC")
HIDDEN_FUNCTIONS = ("pread", "pwrite")


class _NoFcntl:
    """A meta-path finder that makes `import fcntl` fail, as it does on Windows."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "fcntl":
            raise ModuleNotFoundError("No module named 'fcntl' (hidden by tests/posix_free.py)", name=name)
        return None


def hide() -> None:
    sys.meta_path.insert(0, _NoFcntl())
    sys.modules.pop("fcntl", None)
    for name in HIDDEN_FLAGS + HIDDEN_FUNCTIONS:
        if hasattr(os, name):
            delattr(os, name)
    os.supports_dir_fd = set()


def check_hidden() -> None:
    """Fail loudly if anything brought the POSIX-only names back."""
    assert "fcntl" not in sys.modules, "fcntl was imported"
    for name in HIDDEN_FLAGS + HIDDEN_FUNCTIONS:
        assert not hasattr(os, name), name
