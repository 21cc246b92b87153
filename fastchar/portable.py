"""What differs between POSIX and Windows when fastchar opens files, in one place.

Checkpoint reads and the run folder's files are opened without following links. Where the system
has them (Linux, macOS, the BSDs), that is `O_NOFOLLOW` and reads through one handle on the folder
(`O_DIRECTORY` and `dir_fd`). Where it does not (Windows), `open_nofollow` checks the path with
`lstat` first, refuses a link, opens it, and compares the opened file's identity (device and inode,
which Windows fills from its file index) with what `lstat` saw, so a link swapped in between is
refused as well. Leaves out the run folder's lock (runfolder.py, through the `filelock` package).
"""

from __future__ import annotations

import errno
import os
import stat

# Flags a system may lack; 0 where it does. O_BINARY (Windows only) stops newline translation.
CLOEXEC = getattr(os, "O_CLOEXEC", 0) or getattr(os, "O_NOINHERIT", 0)
BINARY = getattr(os, "O_BINARY", 0)


def has_nofollow() -> bool:
    """Whether os.open can refuse a link itself (O_NOFOLLOW)."""
    return hasattr(os, "O_NOFOLLOW")


def has_folder_handles() -> bool:
    """Whether files can be opened through a handle on their folder (O_DIRECTORY and dir_fd)."""
    return hasattr(os, "O_DIRECTORY") and has_nofollow() and os.open in os.supports_dir_fd


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags | O_NOFOLLOW) where the system has it; elsewhere the same guarantee from
    lstat before and fstat after. A link raises OSError(ELOOP), as O_NOFOLLOW does."""
    flags |= CLOEXEC | BINARY
    if has_nofollow():
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    before = _lstat(path)
    if before is not None and stat.S_ISLNK(before.st_mode):
        raise OSError(errno.ELOOP, "is a symbolic link", os.fspath(path))
    if before is None:  # a new file: O_EXCL refuses whatever appears meanwhile, a link included
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, mode) if flags & os.O_CREAT else os.open(path, flags)
        except FileExistsError:
            return open_nofollow(path, flags & ~os.O_EXCL, mode)
    fd = os.open(path, flags & ~(os.O_CREAT | os.O_TRUNC), mode)  # truncated only once checked
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise OSError(errno.ELOOP, "was replaced while being opened", os.fspath(path))
    if flags & os.O_TRUNC:
        os.ftruncate(fd, 0)
    return fd


def _lstat(path: str | os.PathLike) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether process pid runs (or may: one we cannot query counts as running)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a pid no process can have
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    import ctypes

    if not 0 < pid < 2**32:  # a pid no process can have (OpenProcess takes a DWORD)
        return False
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
