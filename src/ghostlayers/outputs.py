"""Where results go, checked before any work is done: the output folder and the export format. No torch here, so
the command line refuses a bad --out or --format at once."""

from __future__ import annotations

from pathlib import Path

from . import recovery
from .errors import GhostlayersError

MANIFEST = "ghostlayers.json"
FORMATS = ("exact", "vanilla", "gguf")
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")  # for the tensors a GGUF export writes anew
FOLDING_METHODS = recovery.names(in_weights=True)  # none, prunecomp, replaceme, procrustes


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


def check_output_file(out: str | Path, overwrite: bool, suffix: str, protect: tuple[str | Path, ...] = ()) -> Path:
    """Fail early when the single-file output `out` (e.g. a .gguf) may not be written: a wrong suffix, an existing
    file without `overwrite`, anything that is not a plain file in the way, or a file in `protect` (the input)."""
    path = Path(out).expanduser()
    if any(path.resolve() == Path(p).expanduser().resolve() for p in protect):
        raise GhostlayersError(f"refusing to overwrite {path}: it is the input model; choose another --out")
    if path.suffix != suffix:
        raise GhostlayersError(f"--out {path} should end in {suffix}: name the file to write, e.g. pruned{suffix}")
    if path.parent.exists() and not path.parent.is_dir():
        raise GhostlayersError(f"cannot create {path}: {path.parent} is a file")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise GhostlayersError(f"output {path} exists and is not a file: choose another --out")
        if not overwrite:
            raise GhostlayersError(f"output file {path} already exists: pass --overwrite or choose another --out")
    return path


def check_destination(out: str | Path, format: str, overwrite: bool, protect: tuple[str | Path, ...] = ()) -> Path:
    """`check_output` for a folder format, `check_output_file` for a GGUF file."""
    if format == "gguf":
        return check_output_file(out, overwrite, ".gguf", protect)
    return check_output(out, overwrite, protect)


def check_quant(format: str, quant: str | None) -> str:
    """The --quant of a GGUF export (default f16), refused for the folder formats, which take --dtype."""
    if quant is not None and format != "gguf":
        raise GhostlayersError("--quant is for --format gguf; a folder export takes --dtype")
    quant = quant or "f16"
    if quant not in GGUF_QUANTS:
        raise GhostlayersError(f"unknown --quant {quant!r}: use one of {', '.join(GGUF_QUANTS)}")
    return quant


def resolve_format(format: str, keeps_operators: bool) -> str:
    """`auto` (prune's default): vanilla where every operator folded into the weights (no remote code needed),
    exact where some are modules; any other format as it is."""
    return ("exact" if keeps_operators else "vanilla") if format == "auto" else format


def check_format(format: str, keeps_operators: bool, what: str = "this model") -> None:
    """Refuse an unknown format, and a vanilla or GGUF export of something whose operators are modules (`what`
    names it); `auto` suits everything."""
    if format == "auto":
        return
    if format not in FORMATS:
        raise GhostlayersError(f"unknown format {format!r}: use exact (every method), vanilla or gguf "
                               f"({', '.join(FOLDING_METHODS)})")
    if format == "gguf" and keeps_operators:
        raise GhostlayersError(
            f"{what} keeps operators as modules, which a GGUF cannot hold: --format gguf works for "
            f"{', '.join(FOLDING_METHODS)} (e.g. --recover procrustes, or --recover none with --refit)"
        )
    if format == "vanilla" and keeps_operators:
        raise GhostlayersError(
            f"{what} keeps operators as modules and cannot be saved as a vanilla checkpoint: --format vanilla "
            f"works for {', '.join(FOLDING_METHODS)}; use --format exact (loads with trust_remote_code=True)"
        )
