"""Save a pruned model to a folder and load it back (`ghostlayers.load`).

Layout of a saved folder:
  config.json, model.safetensors …   the pruned model's own architecture and weights (standard transformers files)
  ghost_operators.safetensors        each operator as "<module>.ghost.weight", e.g. "model.layers.17.ghost.weight"
  tokenizer files
  ghostlayers.json                   the manifest: how the model was made, and which module each operator feeds

Writes go to a hidden temporary folder beside the target, renamed into place at the end, so an interrupted save
leaves no partial folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import GhostlayersError
from .models import load_model
from .surgery import ghost_modules, install_ghost

MANIFEST = "ghostlayers.json"
OPERATORS = "ghost_operators.safetensors"
FORMAT_VERSION = 1


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


def save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    manifest: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write `model`, its operators, `tokenizer` and `manifest` to `out` atomically."""
    target = check_output(out, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise GhostlayersError(f"cannot write to {target.parent}: {err.strerror or err}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        ghosts = ghost_modules(model)
        plain = {k: v for k, v in model.state_dict().items() if ".ghost." not in k}
        model.save_pretrained(tmp, state_dict=plain)
        tensors = {f"{name}.ghost.weight": op.weight.detach().contiguous().cpu() for name, op in ghosts.items()}
        save_file(tensors, str(tmp / OPERATORS), metadata={"format": "ghostlayers"})
        tokenizer.save_pretrained(tmp)
        full = {"format": "ghostlayers", "format_version": FORMAT_VERSION, **manifest}
        full["ghost_modules"] = sorted(ghosts)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GhostlayersError(f"cannot write {target}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise GhostlayersError(f"{file} is not valid JSON ({err}): the export is corrupted") from None


def load(path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """Load a model: a ghostlayers folder (with its operators), or anything `load_model` takes.

    Returns (model, tokenizer, manifest-or-None).
    """
    manifest = read_manifest(path) if Path(str(path)).expanduser().is_dir() else None
    model, tokenizer = load_model(str(path), dtype, device)
    if manifest is None:
        return model, tokenizer, None
    folder = Path(path).expanduser()
    expected = list(manifest.get("ghost_modules", []))
    file = folder / OPERATORS
    if not file.is_file():
        if expected:
            raise GhostlayersError(f"{folder} lacks {OPERATORS} although its manifest lists operators: re-export it")
        return model, tokenizer, manifest
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        wanted = {f"{name}.ghost.weight" for name in expected}
        if keys != wanted:
            raise GhostlayersError(
                f"{file} holds operators {sorted(keys)} but the manifest lists {sorted(wanted)}: the export is corrupted"
            )
        hidden = int(model.config.hidden_size)
        for name in expected:
            weight = f.get_tensor(f"{name}.ghost.weight")
            if tuple(weight.shape) not in ((hidden, hidden), (hidden,)):
                raise GhostlayersError(
                    f"operator {name} has shape {tuple(weight.shape)}, expected ({hidden}, {hidden}) or ({hidden},): "
                    "corrupted export"
                )
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise GhostlayersError(f"operator target {name} does not exist in the model: corrupted export") from None
            install_ghost(module, weight.to(torch.float64))
    return model, tokenizer, manifest
