"""Output paths: checked before the work, staged under a temporary name that records its owner's PID, renamed when
complete, and the staging of dead processes cleaned up by the next run.

The rules for single files (verify --html) match the output folders' (graphq.model_io.atomic_output_dir): an input is
never overwritten, not even with --overwrite; an existing file is replaced only with --overwrite; a half-written file
never carries the name.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from graphq.errors import GraphqError

#: Write errors the user fixes by freeing space or choosing another place; reported as one line.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def resolve_output_path(path: Path, what: str) -> Path:
    """``path`` made absolute with symlinks followed; a symlink loop is bad input, not a traceback."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop, later versions OSError
        raise GraphqError(f"{what} {path} cannot be resolved ({exc}): choose another path") from exc


def check_writable_parent(path: Path, what: str) -> None:
    """The folder that will hold ``path`` exists (or can be created) and is writable: checked before any work."""
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link, or one into a loop
            raise GraphqError(f"{what} {path} lies under {ancestor}, a broken symbolic link: choose another path")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise GraphqError(f"{what} {path} lies under {ancestor}, which is a file, not a folder: choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise GraphqError(f"cannot write {what} {path}: {ancestor} is not writable; choose another place")


def model_input_files(model_file: Path) -> list[Path]:
    """The files a model run reads: everything in the model's folder (graph, external data, tokenizer, config)."""
    folder = model_file.parent
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else [model_file]


def check_output_file(path: str | Path, inputs: list[Path], overwrite: bool, what: str = "output file") -> Path:
    """Refuse, before any work, an output file that is an input, a folder, or exists without ``overwrite``."""
    path = Path(path)
    target = resolve_output_path(path, what)
    for source in inputs:
        try:
            same = source.exists() and target.exists() and os.path.samefile(source, target)
        except OSError:
            same = False
        if same or target == resolve_output_path(source, "input"):
            raise GraphqError(f"{what} {path} is one of the inputs ({source}): write it somewhere else")
    if target.is_dir():
        raise GraphqError(f"{what} {path} is a folder: name a file, such as {path / 'report.html'}")
    if target.exists() and not overwrite:
        raise GraphqError(f"{what} {path} already exists: choose another name or pass --overwrite")
    check_writable_parent(target, what)
    return target


_OWNER = re.compile(r"\.pid(\d+)-([0-9a-f]{8})\.")


def host_tag() -> str:
    """Eight hex digits naming this machine: a PID means nothing on another host (or container) sharing the disk."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_prefix(output_dir: Path, pid: int | None = None) -> str:
    """``.<name>.pid<PID>-<host>.``: the name says which process on which machine owns the staging, so a later run
    can tell when it is stale."""
    return f".{output_dir.name}.pid{os.getpid() if pid is None else pid}-{host_tag()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(output_dir: Path) -> None:
    """Remove the ``.partial`` / ``.old`` folders (or files) that a killed run (kill -9, power loss) left beside
    ``output_dir``.

    Only folders made on this host whose recorded PID is no longer running are touched; a live run's staging, and
    another machine's, is left alone. A stale
    ``.old`` folder still holding the previous output while ``output_dir`` is missing (killed between the two
    renames of a replace) is renamed back instead of deleted."""
    if not output_dir.parent.is_dir():
        return
    for folder in sorted(output_dir.parent.glob(f".{glob.escape(output_dir.name)}.pid*")):
        owner = _OWNER.match(folder.name[len(output_dir.name) + 1 :])
        if owner is None or owner.group(2) != host_tag() or not folder.name.endswith((".partial", ".old")):
            continue
        if _process_alive(int(owner.group(1))):
            continue
        previous = folder / "previous"
        if folder.name.endswith(".old") and previous.is_dir() and not output_dir.exists():
            os.replace(previous, output_dir)
            print(f"graphq: restored {output_dir} from {folder.name}, left by process {owner.group(1)} while it "
                  "replaced the folder", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
        print(f"graphq: removed {folder.name}, left unfinished by process {owner.group(1)}, which is no longer "
              "running", file=sys.stderr)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary file beside ``path`` and rename it into place when complete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        handle, temporary = tempfile.mkstemp(prefix=staging_prefix(path), suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise GraphqError(f"cannot write {path}: {exc.strerror or exc}; choose another place") from exc
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; the result should look like any other file
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            raise GraphqError(f"cannot write {path}: {exc.strerror}; free some space or choose another place") from exc
        raise
    return path
