"""Where results go, checked before any work is done: the output folder and the export format. No torch here, so
the command line refuses a bad --out or --format at once."""

from __future__ import annotations

from pathlib import Path

from . import recovery
from .errors import GhostlayersError

MANIFEST = "ghostlayers.json"
FORMATS = ("exact", "vanilla")
FOLDING_METHODS = recovery.names(folds=True)  # none, prunecomp, replaceme, procrustes


def check_output(out: str | Path, overwrite: bool, protect: tuple[str | Path, ...] = ()) -> Path:
    """Fail early (before any work) when `out` may not be written.

    With `overwrite`, only an earlier export (a folder with a manifest) or an empty folder is replaced, never the
    working directory, one of its parents, or a folder in `protect` (the input model).
    """
    path = Path(out).expanduser()
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise GhostlayersError(f"cannot create {path}: {path.parent} is a file")
        return path
    if not overwrite:
        raise GhostlayersError(f"output folder {path} already exists: pass --overwrite or choose another --out")
    if not path.is_dir():
        raise GhostlayersError(f"output {path} exists and is not a folder: choose another --out")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or any(resolved == Path(p).expanduser().resolve() for p in protect):
        raise GhostlayersError(f"refusing to overwrite {path}: it is the current folder, a parent of it, or the input model")
    if not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise GhostlayersError(
            f"refusing to overwrite {path}: it is not empty and not a ghostlayers export; choose another --out"
        )
    return path


def check_format(format: str, keeps_operators: bool, what: str = "this model") -> None:
    """Refuse an unknown format, and a vanilla export of something whose operators are modules (`what` names it)."""
    if format not in FORMATS:
        raise GhostlayersError(f"unknown format {format!r}: use exact (every method) or vanilla ({', '.join(FOLDING_METHODS)})")
    if format == "vanilla" and keeps_operators:
        raise GhostlayersError(
            f"{what} keeps operators as modules and cannot be saved as a vanilla checkpoint: --format vanilla "
            f"works for {', '.join(FOLDING_METHODS)}; use --format exact (loads with trust_remote_code=True)"
        )
