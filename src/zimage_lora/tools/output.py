"""Writing results in place of `--out` without ever leaving a broken one.

A result is written under a temporary name next to `--out` (`.NAME.partial-PID`) and moved into place
when complete. A file replaces a file in one rename; a folder is swapped with the old output in one
atomic exchange on Linux (elsewhere the old one is moved aside first, `.NAME.old-PID`: see
`move_into_place` for the window that leaves), and only then is the old one deleted, so a kill leaves
either the old output or the new one at `--out`. Leftovers of a killed run are removed by the next run
to the same place once their process is gone. Every file-system failure becomes one `LoRAError` that
says the cause and the fix. Written files and folders get the modes the umask gives new ones.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import LoRAError


class OutputError(LoRAError, OSError):
    """`--out` cannot be written: missing folder, read-only or full disk, bad path."""


def output_error(exc: OSError, out: Path, *, needed: int | None = None) -> OutputError:
    """The one-line message for a file-system failure while writing `out`."""
    where = out.parent
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        size = f" ({_size(needed)} needed)" if needed else ""
        fix = f"no space left on the disk holding {where}{size}. Free some space or choose --out on another disk."
    elif code == errno.EROFS:
        fix = f"{where} is on a read-only file system. Choose --out on a writable disk."
    elif code in (errno.EACCES, errno.EPERM):
        fix = f"permission denied in {where}. Choose a folder you can write to, or fix its permissions."
    elif code == errno.ENAMETOOLONG:
        fix = "the path is too long for the file system. Choose a shorter --out."
    elif code in (errno.ENOENT, errno.ENOTDIR) and not _is_dir(where):
        fix = f"{where} is not an existing folder. Create it first (mkdir -p '{where}') or choose another --out."
    elif code == errno.ENOENT:
        fix = f"cannot create files in {where} (not a folder on a disk, e.g. /proc or /sys). Choose another --out."
    else:
        fix = f"{exc.strerror or exc}. Check the path, the permissions and the free space."
    err = OutputError(f"cannot write {out}: {fix}")
    err.errno = code
    return err


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def check_out(out: Path, overwrite: bool) -> None:
    """Before any work: `out` is a path we could create (parent folder exists, name not too long)."""
    try:
        exists = out.exists() or out.is_symlink()
        parent_ok = out.parent.is_dir()
    except OSError as exc:
        raise output_error(exc, out) from None
    if exists and not overwrite:
        raise OutputError(f"{out} already exists; choose another --out or pass --overwrite.")
    if not parent_ok:
        raise OutputError(
            f"cannot write {out}: {out.parent} is not an existing folder. Create it first "
            f"(mkdir -p '{out.parent}') or choose another --out."
        )
    if len(out.name.encode()) + 24 > _name_max(out.parent):  # room for '.NAME.partial-PID'
        raise output_error(OSError(errno.ENAMETOOLONG, "File name too long"), out)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_space(out: Path, needed: int) -> None:
    """Refuse before writing when the disk holding `out` cannot take `needed` bytes."""
    try:
        usage = shutil.disk_usage(out.parent)
    except OSError:
        return  # unknown: the write itself will tell
    if usage.total and usage.free < needed:  # total 0: /proc and the like, where the write itself fails
        raise output_error(OSError(errno.ENOSPC, "No space left on device"), out, needed=needed)


def temp_path(out: Path, kind: str = "partial") -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


def clean_leftovers(out: Path) -> tuple[list[Path], list[Path]]:
    """Remove `.NAME.partial-PID` / `.NAME.old-PID` next to `out` whose process has ended.

    Returns (removed, kept): those of a process still running (another merge at work) are kept.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    removed: list[Path] = []
    kept: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed, kept
    for path in sorted(entries):
        match = pattern.match(path.name)
        if not match:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _running(pid):
            kept.append(path)
            continue
        remove(path)
        removed.append(path)
    return removed, kept


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours (or cannot tell): leave its files alone
    return True


@contextmanager
def written_aside(out: Path) -> Iterator[Path]:
    """`with written_aside(out) as tmp:` write the new output at `tmp`; it is moved into place when
    the block succeeds and removed when it raises (anything, Ctrl-C included). File-system errors
    pass through unchanged: each caller words them (`output_error`)."""
    tmp = temp_path(out)
    try:
        yield tmp
        follow_umask(tmp)
        move_into_place(tmp, out)
    except BaseException:
        remove(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read (set and restore at once)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes a new file or folder gets under the
    umask: safetensors writes its files 0600, which a ComfyUI running as another user cannot read."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def move_into_place(tmp: Path, out: Path) -> None:
    """New output in, old one out, then the old one deleted: `out` is never missing or half-written.

    A file over a file is one rename. A folder (or a file replacing a folder, or the reverse) is
    swapped with the old output in one atomic exchange where the system has one (Linux renameat2
    RENAME_EXCHANGE); the old output then sits at the temporary name until it is deleted. Elsewhere
    it takes two renames (old aside, new in): a kill between them leaves `out` missing, with the old
    output at `.NAME.old-PID` and the new one at `.NAME.partial-PID` (the next run removes both)."""
    if out.exists() or out.is_symlink():
        if ((out.is_dir() and not out.is_symlink()) or tmp.is_dir()) and _exchange(tmp, out):
            remove(tmp)  # now the old output
            return
    old = None
    if out.exists() or out.is_symlink():
        if (out.is_dir() and not out.is_symlink()) or tmp.is_dir():
            old = temp_path(out, "old")
            remove(old)
            os.replace(out, old)
    try:
        os.replace(tmp, out)  # for a file over a file this one rename is the whole swap
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        remove(old)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: two renames instead
    raise OSError(code, os.strerror(code), str(b))


def remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass  # best effort: a leftover is listed by the next run, never fatal here
