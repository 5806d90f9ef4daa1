"""App bundles: everything an app needs at run time in one directory, described by ``manifest.json``.

::

    runs/quickstart/bundle/
      manifest.json        {"format": "lmstack-bundle", "version": 1, "app": "support",
                            "parts": {"model": "model", "index": "index.sqlite", "ranker": "ranker.json", ...},
                            "settings": {"k": 3, "system_prompt": "...", ...},
                            "files": {"model/model.safetensors": "<sha256>", ...}}
      model/               a Hugging Face model directory (or the base, with adapter/ beside it)
      index.sqlite ...     the app's other parts

``lmstack <app> chat|serve BUNDLE`` and ``<App>.load(BUNDLE)`` read only this directory. Parts are hard links
where the file system allows (no second copy of multi-GB weights), else copies; the bundle is written to a
temporary directory and renamed into place, so a half-written bundle never exists. A bundle comes from
strangers as often as a model directory does: the manifest is size-capped, every part path must stay inside
the bundle, and :func:`verify` checks the recorded hashes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack._version import __version__
from lmstack.errors import CheckpointError
from lmstack.utils.io import atomic_dir, atomic_write_json, file_sha256

FORMAT, VERSION = "lmstack-bundle", 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20


@dataclass
class Bundle:
    root: Path
    app: str
    parts: dict[str, str | None]  # role -> path relative to root (None: absent)
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    created: str = ""
    lmstack_version: str = ""

    def part(self, role: str) -> Path | None:
        """Absolute path of a part, or None when the bundle has none."""
        rel = self.parts.get(role)
        return None if rel is None else self.root / rel


def _place(src: Path, dst: Path, link: bool) -> None:
    """Hard-link (or copy) a file or directory tree from ``src`` to ``dst``."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for p in sorted(src.iterdir()):
            if p.name.startswith(".") or p.is_symlink():
                continue
            _place(p, dst / p.name, link)
        return
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copy2(src, dst)


def write_bundle(out: str | os.PathLike, app: str, parts: dict[str, str | os.PathLike | None],
                 settings: dict[str, Any], *, link: bool = True) -> Bundle:
    """Gather ``parts`` (role -> file or directory; None: absent) under ``out`` with a manifest; atomic."""
    out = Path(out)
    rel: dict[str, str | None] = {}
    with atomic_dir(out) as tmp:
        for role, src in parts.items():
            if src is None:
                rel[role] = None
                continue
            src = Path(src)
            if not src.exists():
                raise CheckpointError(f"bundle part {role!r}: {src} does not exist")
            name = role if src.is_dir() else role + "".join(src.suffixes)
            _place(src, tmp / name, link)
            rel[role] = name
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "version": VERSION, "app": app, "lmstack_version": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "parts": rel, "settings": settings, "files": files}
        atomic_write_json(tmp / MANIFEST, manifest)
    return read_bundle(out)


def _inside(root: Path, rel: Any, where: str) -> str:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CheckpointError(f"{root / MANIFEST}: {where} must be a relative path inside the bundle, got {rel!r}")
    return rel


def read_bundle(path: str | os.PathLike, app: str | None = None) -> Bundle:
    """Read and check a bundle's manifest (not its hashes: :func:`verify`). ``app``: the app it must be for."""
    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{root}: not an app bundle (no {MANIFEST}); build one with `lmstack run RECIPE` "
                              "(its bundle stage)")
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{mf}: {mf.stat().st_size} bytes, more than a manifest can be "
                              f"({MAX_MANIFEST_BYTES}); is this an lmstack bundle?")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mf}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: not an lmstack bundle manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") != VERSION:
        raise CheckpointError(f"{mf}: bundle version {m.get('version')!r}; this lmstack reads version {VERSION}")
    if app is not None and m.get("app") != app:
        raise CheckpointError(f"{root}: a bundle of app {m.get('app')!r}, not {app!r}; use `lmstack {m.get('app')} ...`")
    parts = m.get("parts") or {}
    if not isinstance(parts, dict):
        raise CheckpointError(f"{mf}: parts must be a mapping")
    rel = {str(k): (None if v is None else _inside(root, v, f"parts.{k}")) for k, v in parts.items()}
    for role, r in rel.items():
        if r is not None and not (root / r).exists():
            raise CheckpointError(f"{root}: bundle part {role!r} ({r}) is missing; rebuild the bundle")
    files = m.get("files") or {}
    return Bundle(root, str(m.get("app")), rel, dict(m.get("settings") or {}),
                  {_inside(root, k, "files"): str(v) for k, v in files.items()}, str(m.get("created", "")),
                  str(m.get("lmstack_version", "")))


def verify(bundle: Bundle) -> list[str]:
    """Files whose content no longer matches the manifest (empty: intact)."""
    return [rel for rel, sha in bundle.files.items()
            if not (bundle.root / rel).is_file() or file_sha256(bundle.root / rel) != sha]
