"""Folders fgcompile owns: the marker that says fgcompile wrote a folder, the rules for replacing one,
the crash-safe swap, recovery after a crash, and the exclusive lock of a run.

Replace rule: `compile -o OUT` replaces OUT only if it is missing, empty, or holds the marker (a folder
fgcompile compiled); a compiled folder that holds training (checkpoint or log) or files fgcompile did not write
(named in the refusal) needs --force; an OUT that equals or contains the input model is never replaced.
Swap: OUT → .OUT.fgcompile-old-PID, staging → OUT, then the old one is removed. A crash between the two
renames leaves OUT missing and the old folder beside it; the next run that touches OUT puts it back.
Everything fgcompile leaves behind after kill -9 (staging folders, old folders, .tmp files) carries
the writing process's pid in its name and is removed once that process is gone.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import tempfile

from fgcompile import __version__, modelio
from fgcompile.artifact import LAYOUT
from fgcompile.errors import OutputError

_STAGING = "fgcompile-staging"
_OLD = "fgcompile-old"


def _leftover(parent: pathlib.Path, name: str, kind: str):
    """(path, pid) of every leftover `.{name}.{kind}-{pid}…` in parent."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.{kind}-(\d+)(-\w+)?$")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    return [(p, int(m.group(1))) for p in entries if (m := pattern.match(p.name))]


def recover(out) -> None:
    """Undo what a killed run left around OUT: put back a folder lost between the swap's two renames,
    and remove staging folders, old folders and temp files whose process is gone."""
    out = pathlib.Path(out)
    for old, pid in _leftover(out.parent, out.name, _OLD):
        if modelio.process_alive(pid):
            continue
        if not os.path.lexists(out) and (old / LAYOUT.marker).is_file():
            os.replace(old, out)     # the crash came between the renames: the old folder is the last whole one
        else:
            shutil.rmtree(old, ignore_errors=True)
    for staging, pid in _leftover(out.parent, out.name, _STAGING):
        if not modelio.process_alive(pid):
            shutil.rmtree(staging, ignore_errors=True)
    if out.is_dir() and (out / LAYOUT.marker).is_file():
        modelio.remove_stale_temps(out)


def is_owned(folder, kind: str = "compiled") -> bool:
    """Whether fgcompile wrote FOLDER as a `kind` folder: its marker says so, or (a compiled folder from
    before markers) it holds train.onnx and nothing but the compiled layout's own file names."""
    folder = pathlib.Path(folder)
    try:
        return json.loads((folder / LAYOUT.marker).read_text()).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        pass
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    return kind == "compiled" and LAYOUT.train in names and names <= LAYOUT.names()


def marker(folder) -> dict:
    try:
        data = json.loads((pathlib.Path(folder) / LAYOUT.marker).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def check_replaceable(out, inputs=(), force: bool = False, kind: str = "compiled",
                      own_training: bool = False) -> None:
    """Raise OutputError unless OUT may be (re)written as a `kind` folder (see the module's rule).
    own_training: the caller made OUT's training itself (the demo) and may discard it without force."""
    out = pathlib.Path(out)
    real = modelio.real_path(out)
    for source in inputs:
        src = modelio.real_path(source)
        if src == real or real in src.parents:
            raise OutputError(f"{out}: this output folder holds the input {source}; writing it would delete "
                              "the input. Choose an -o folder outside the input's folder, e.g. -o compiled/.")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder. Choose another -o.")
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError as exc:
        raise OutputError(f"{out}: cannot read this folder ({exc.strerror}). Choose another -o.") from None
    if not entries:
        return
    if not is_owned(out, kind):
        raise OutputError(f"{out}: the folder exists and was not written by fgcompile ({len(entries)} entries, "
                          f"e.g. {sorted(entries)[0]!r}); fgcompile replaces only folders it wrote. Choose a new "
                          "or empty -o folder.")
    if kind != "compiled" or force:
        return
    # the swap replaces the whole folder: anything in it that fgcompile did not write would go with it
    foreign = sorted(n for n in entries if n not in LAYOUT.names() and not modelio.is_temp(n))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{out}: holds files fgcompile did not write ({shown}) that recompiling would delete. "
                          "Move them out of the folder, choose another -o, or pass --force to delete them.")
    trained = [n for n in (LAYOUT.checkpoint, LAYOUT.log) if n in entries]
    if trained and not own_training:
        raise OutputError(f"{out}: holds training ({', '.join(trained)}) that recompiling would discard. Export "
                          f"it first (fgcompile export {out} -o adapted.onnx), choose another -o, or pass --force "
                          "to replace it.")


@contextlib.contextmanager
def staged(out, kind: str = "compiled", source=None):
    """Yield a fresh staging folder beside OUT (holding the marker and the lock file); on success swap it
    in for OUT. On failure OUT is untouched and the staging folder is gone."""
    out = pathlib.Path(out)
    if out.is_symlink():
        out = modelio.real_path(out)
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.{_STAGING}-{os.getpid()}-", dir=out.parent))
    try:
        with _writing(out):
            _mark(staging, kind, source)
        yield staging
        _swap(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _writing(out: pathlib.Path):
    """An OSError while making OUT's staging folder: a full disk says so, anything else is 'cannot write here'."""
    try:
        yield
    except OSError as exc:
        if exc.errno in modelio.NO_SPACE:
            raise modelio.no_space(out, None) from None
        raise OutputError(f"{out}: cannot write here ({exc.strerror}). Choose a writable folder with -o.") from None


def _mark(staging: pathlib.Path, kind: str, source) -> None:
    """The staging folder's permissions, marker and lock file."""
    info = {"kind": kind, "fgcompile": __version__}
    if source is not None:
        info["source"] = str(modelio.real_path(source))
    staging.chmod(modelio.default_mode(directory=True))
    modelio.save_json(staging / LAYOUT.marker, info)
    (staging / LAYOUT.lock).touch()


def _swap(staging: pathlib.Path, out: pathlib.Path) -> None:
    if not os.path.lexists(out):
        os.replace(staging, out)
        return
    with locked(out, "replace"):
        old = out.with_name(f".{out.name}.{_OLD}-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def locked(folder, action: str = "train"):
    """Hold an exclusive flock on FOLDER/.fgcompile.lock; a second process gets OutputError naming the
    first's pid. The kernel drops the lock when the holder exits, however it exits."""
    import fcntl
    path = pathlib.Path(folder) / LAYOUT.lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, modelio.default_mode())
    except OSError as exc:
        raise OutputError(f"{path}: cannot open the lock file ({exc.strerror}). Check the folder's "
                          "permissions.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise OutputError(f"{folder}: another fgcompile process (pid {holder}) is using this folder; cannot "
                              f"{action} it at the same time. Wait for that process to finish (or stop it), "
                              "or use another folder.") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:   # the pid only names the holder: a full disk must not stop a run writing elsewhere
            if exc.errno not in modelio.NO_SPACE:
                raise
        yield
    finally:
        os.close(fd)
