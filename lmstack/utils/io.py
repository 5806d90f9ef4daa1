"""Atomic file and directory writes (temp + rename) and hashing.

A reader never sees a half-written file: we write next to the target, fsync, then ``os.replace``.
Directories (checkpoints) are written to ``NAME.tmp-<pid>`` and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmstack.errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success rename it over ``path``; on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, sort_keys=False)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (an existing one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove what :func:`atomic_write` / :func:`atomic_dir` leave behind when their process was killed
    (SIGKILL, power loss): ``.NAME.PID.XXXX.tmp`` files, ``.NAME.tmp-PID`` / ``.NAME.old-PID`` directories, and
    pre-PID ``.NAME.XXXX.tmp`` files. Temporaries of a process that is still running are kept. Returns the
    removed paths."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in d.iterdir():
        name = p.name
        if not name.startswith("."):
            continue
        pid = None
        m = re.fullmatch(r"\..+\.(?:tmp|old)-(\d+)", name) or re.fullmatch(r"\..+?\.(\d+)\.[^.]+\.tmp", name)
        if m:
            pid = int(m.group(1))
        elif not re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", name):
            continue  # not one of ours
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        if pid == os.getpid():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def looks_binary(sample: bytes) -> bool:
    """Whether the first bytes of a file are not text: a NUL byte, or more than 10% control characters other
    than tab / newline / form feed / CR / escape (the heuristic of ``file`` and git: text never holds NUL)."""
    if not sample:
        return False
    if b"\x00" in sample:
        return True
    ctrl = sum(1 for b in sample if b < 32 and b not in (9, 10, 12, 13, 27))
    return ctrl > 0.1 * len(sample)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MAX_JSON_BYTES = 256 << 20  # configs, indexes, tokenizers: the largest real tokenizer.json is ~35 MB


def check_size(path: str | os.PathLike, limit: int = MAX_JSON_BYTES, *, error: type[Exception] = DataError) -> None:
    """Refuse a file larger than ``limit`` before reading it (untrusted directories may hold anything)."""
    size = Path(path).stat().st_size
    if size > limit:
        raise error(f"{path}: {size:,} bytes, over the {limit:,}-byte limit for this kind of file; "
                    "is it the right file?")


def read_json(path: str | os.PathLike, *, error: type[Exception] = DataError) -> Any:
    """Read a JSON file; a missing file or parse error raises ``error`` naming the file, line and column.
    Files over :data:`MAX_JSON_BYTES` are refused before reading."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    check_size(path, error=error)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None


def write_jsonl(path: str | os.PathLike, rows: Any) -> int:
    """Write an iterable of dicts as JSON Lines, atomically; return the number of rows."""
    n = 0
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_jsonl(path: str | os.PathLike, *, error: type[Exception] = DataError) -> Iterator[Any]:
    """The records of a JSON Lines file written by lmstack (blank lines skipped); a bad line raises ``error``
    naming ``file:line``. Readers of *user* data count bad records instead (lmstack.data.readers)."""
    for _, row in iter_jsonl_numbered(path, error=error):
        yield row


def iter_jsonl_numbered(path: str | os.PathLike, *, error: type[Exception] = DataError) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of a JSON Lines file (blank lines skipped), for readers that check each record
    and name ``file:line`` in their own errors; a line that is not JSON raises ``error``."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{i}: not valid JSON ({e.msg})") from None


def dir_sha256(root: str | os.PathLike) -> str:
    """Content hash of every (non-hidden) file under ``root``, names included."""
    root, h = Path(root), hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(root)).encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def model_dir_hash(path: str | os.PathLike) -> str:
    """Cheap identity of a (possibly multi-GB) model directory: config and tokenizer content, weight sizes/mtimes."""
    path, h = Path(path), hashlib.sha256()
    if not path.is_dir():
        return "missing"
    for p in sorted(path.iterdir()):
        if not p.is_file():
            continue
        h.update(p.name.encode())
        if p.suffix in (".json", ".jinja", ".txt", ".model"):
            h.update(file_sha256(p).encode())
        else:
            st = p.stat()
            h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()


def iter_jsonl_lines(path: str | os.PathLike, bad: Any, max_line_bytes: int = 8 << 20) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a *user's* JSON Lines file, streamed. A line that is
    not JSON, or longer than ``max_line_bytes`` (skipped without being held whole), is passed to
    ``bad(lineno, reason)`` and the reading goes on: one malformed record is not fatal to a million good ones.
    A ``.gz`` file is read through gzip (streamed: a line is still read in bounded pieces)."""
    import gzip

    with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded pieces
                    raw = f.readline(max_line_bytes + 1)
                bad(lineno, f"line over {max_line_bytes:,} bytes; skipped")
                continue
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except UnicodeDecodeError:
                bad(lineno, "not UTF-8 text")
            except json.JSONDecodeError as e:
                bad(lineno, f"invalid JSON ({e.msg})")
