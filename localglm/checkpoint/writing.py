"""Writing outputs (quantized directories, GGUF files, tiny checkpoints) so that a failure costs nothing.

Every writer builds its output under a temporary name beside it and publishes it with a rename. These
helpers give the failure side one shape: an `OSError` (full disk, read-only or missing directory, no
permission) becomes one line naming the output and the cause, and whatever was half-written is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import LocalGLMError


def write_error(out: Path, exc: OSError) -> LocalGLMError:
    """The one-line error for an OSError met while writing `out` (the cause as the OS words it)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    hint = " (free some space, or write elsewhere)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return LocalGLMError(f"{out}: cannot write: {cause}{hint}; nothing was left behind")


@contextmanager
def writing(out: Path, *partial: Path) -> Iterator[None]:
    """Run a writer: on any failure remove the `partial` paths (temp files or directories) it made, and
    turn an OSError into one line naming `out`. `out` itself is never touched here."""
    try:
        yield
    except BaseException as exc:
        for p in partial:
            remove_quietly(p)
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise write_error(out, exc) from None
        raise


def remove_quietly(path: Path) -> None:
    """Remove a file or directory tree we created, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def process_umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def open_modes(tmp: Path) -> None:
    """Give a directory built aside the modes a plain mkdir and open would have: mkdtemp's folder is 0700 and
    temporary files 0600, so a published checkpoint was readable by its owner only."""
    mask = process_umask()
    tmp.chmod(0o777 & ~mask)
    for p in tmp.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def refuse_odd_target(out: Path, want: str = "directory") -> None:
    """One line where `out` exists as something a writer of a `want` ("directory" or "file") must never replace: a
    device node (as root, `make-tiny /dev/null` renamed the device aside and deleted it), a link, or the other kind."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not (out.is_dir() if want == "directory" else out.is_file()):
        raise LocalGLMError(f"{out}: exists and is not a {'regular file' if want == 'file' else want}; refusing to replace it")


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`, replacing an existing `out` (already checked to hold only
    what may be replaced): the old one is renamed aside first and removed last, so a failure in between
    leaves either the old or the new output in place, never neither. Only a directory is ever replaced: a
    file, a device node (/dev/null) or a link in its place is refused, whatever the caller checked."""
    refuse_odd_target(out)
    open_modes(tmp)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    remove_quietly(old)
