"""Save a pruned model as a Hugging Face folder and load it back, refusing anything corrupted on the way.

Two formats:
  exact    (every method) config.json names `model_type: "ghostlayers_<base>"` and an `auto_map` to
           modeling_ghostlayers.py (a copy of `runtime.py`), the operators are tensors "<module>.ghost.<part>" in
           the safetensors weights (part: weight, or down and up, and an optional bias), declared in config.json's
           `ghost_operators` {module: {part: shape}} (exports written before operators had parts declare
           {module: shape}, meaning {"weight": shape}, and still load). Loads with
           `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` anywhere, and fails loudly without
           `trust_remote_code`.
  vanilla  (methods that fold into the weights: none, prunecomp, replaceme, procrustes) the base architecture's own config and
           weights, loadable by anything that reads a standard checkpoint.
Both also hold the tokenizer and ghostlayers.json, the manifest: how the model was made.

Writes go to a hidden temporary folder beside the target, renamed into place at the end, so an interrupted save
leaves no partial folder. Loading reads safetensors only, never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import runtime
from .version import __version__
from .errors import GhostlayersError
from .models import DTYPES, adapter, base_classes, load_model
from .operators import shape_of
from .outputs import MANIFEST, check_format, check_output
from .locate import declared_license
from .plan import Plan
from .report import model_card
from .surgery import ghost_modules

if TYPE_CHECKING:
    from .offload import Offloaded

REMOTE_CODE = "modeling_ghostlayers.py"
FORMAT_VERSION = 2

def _weights(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict with floating tensors in `dtype` (operators in `runtime.operator_dtype(dtype)`), on the CPU.

    Tensors that share storage (tied embeddings) stay shared, so transformers saves them once.
    """
    cast: dict[tuple[int, torch.dtype], torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        target = runtime.operator_dtype(dtype) if ".ghost." in name else dtype
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(), target)
        if key not in cast:
            cast[key] = tensor.detach().to("cpu", target).contiguous()
        out[name] = cast[key]
    return out


def _config(model: PreTrainedModel, format: str, dtype: torch.dtype):
    """The config to write: the base architecture's (vanilla) or its ghostlayers subclass with the operators."""
    operators = {name: operator_parts(op) for name, op in sorted(ghost_modules(model).items())}
    return config_to_write(model.config, operators, format, dtype)


def config_to_write(source, operators: dict[str, dict[str, list[int]]], format: str, dtype: torch.dtype):
    """`source` (a pruned model's config) as the base architecture's config (vanilla) or its ghostlayers subclass
    declaring `operators` ({module: {part: shape}})."""
    base_config, base_model = base_classes(source.model_type)
    values = {k: v for k, v in source.to_dict().items() if k not in ("model_type", "auto_map", "ghost_operators")}
    values["dtype"] = str(dtype).removeprefix("torch.")
    if format == "vanilla":
        config = base_config.from_dict(values)
        config.architectures = [base_model.__name__]
        return config
    config_cls, _ = runtime.ghostlayers_classes(base_config, base_model)
    config = config_cls.from_dict(values)
    config.architectures = ["GhostlayersForCausalLM"]
    module = REMOTE_CODE.removesuffix(".py")
    config.auto_map = {"AutoConfig": f"{module}.GhostlayersConfig", "AutoModelForCausalLM": f"{module}.GhostlayersForCausalLM"}
    config.ghost_operators = operators
    return config


def operator_parts(op: torch.nn.Module) -> dict[str, list[int]]:
    """An installed operator's declaration in config.json: {part: shape} of the parts it has, e.g. {"weight":
    [C, C]} or {"down": [C, r], "up": [r, C], "bias": [C]}."""
    return {name: list(p.shape) for name, p in op.named_parameters(recurse=False)}


def _stored_operators(headers: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """{module: {part: (shape, dtype)}} of the operator tensors "<module>.ghost.<part>" among the weights."""
    stored: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for key, value in headers.items():
        if ".ghost." in key:
            module, _, part = key.rpartition(".ghost.")
            stored.setdefault(module, {})[part] = value
    return stored


def _part_order(part: str) -> tuple[int, str]:
    parts = runtime.GhostOperator.PARTS
    return (parts.index(part) if part in parts else len(parts), part)


def _operator_problems(name: str, declaration: Any, stored: dict[str, tuple[int, ...]], hidden: Any) -> list[str]:
    """What is wrong with operator `name`: its parts in the weights (`stored`, part -> shape) against its
    `declaration` in config.json ({part: shape}, or a bare shape meaning {"weight": shape}), and that against
    the hidden size."""
    try:
        want = {k: tuple(v) for k, v in runtime.normalise_parts(declaration).items()}
    except (ValueError, TypeError):
        return [f"config.json declares operator {name} as {declaration!r}, not as the shapes of its parts"]
    problems = []
    for part in sorted(set(want) | set(stored), key=_part_order):
        if part not in stored:
            problems.append(f"operator {name} part {part} (declared {want[part]}) is missing from the weights")
        elif part not in want:
            problems.append(f"the weights hold a part {part} {stored[part]} of operator {name} that config.json does not declare")
        elif stored[part] != want[part]:
            problems.append(f"operator {name} part {part} has shape {stored[part]}, config.json declares {want[part]}")
    hidden = hidden if isinstance(hidden, int) else None
    problems += [f"operator {name} (hidden size {hidden}): {p}" for p in runtime.operator_problems(want, hidden)]
    return problems


def remote_code(model: PreTrainedModel | str) -> str:
    """modeling_ghostlayers.py: `runtime.py` verbatim, then the line that names the base architecture (of `model`,
    or the model_type given)."""
    config_cls, model_cls = base_classes(model if isinstance(model, str) else model.config.model_type)
    return (
        Path(runtime.__file__).read_text()
        + f"\n\n# Written by ghostlayers {__version__} for this export: its base architecture.\n"
        + f"from transformers import {config_cls.__name__}, {model_cls.__name__}  # noqa: E402\n\n"
        + f"GhostlayersConfig, GhostlayersForCausalLM = ghostlayers_classes({config_cls.__name__}, {model_cls.__name__})\n"
    )


def save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    format: str = "exact",
    dtype: str = "auto",
) -> Path:
    """Write `model` (pruned in memory, or loaded from an export), `tokenizer` and `manifest` to `out`, atomically.

    format: exact (operators as modules, loads with trust_remote_code) or vanilla (methods that fold only).
    dtype: auto (the model's own), float32, bfloat16 or float16 for the weights; operators stay float32 or wider.
    """
    manifest = dict(manifest or {})
    method = (manifest.get("recovery") or {}).get("method")
    check_format(format, bool(ghost_modules(model)), f"recovery {method!r}" if method else "this model")
    weights_dtype = _weights_dtype(dtype, model.dtype)
    return _write(
        out, overwrite, lambda tmp: model.save_pretrained(tmp, state_dict=_weights(model.state_dict(), weights_dtype)),
        _config(model, format, weights_dtype), tokenizer, manifest, format, sorted(ghost_modules(model)), weights_dtype,
    )


def _weights_dtype(dtype: str, auto: torch.dtype) -> torch.dtype:
    if dtype != "auto" and dtype not in ("float32", "bfloat16", "float16"):
        raise GhostlayersError(f"unknown dtype {dtype!r} for the saved weights: use auto, float32, bfloat16 or float16")
    return auto if dtype == "auto" else DTYPES[dtype]


def _write(
    out: str | Path,
    overwrite: bool,
    write_weights: Callable[[Path], None],
    config,
    tokenizer: PreTrainedTokenizerBase,
    manifest: dict[str, Any],
    format: str,
    modules: list[str],
    weights_dtype: torch.dtype,
) -> Path:
    """Write an export into a temporary folder next to `out` and rename it into place: nothing is left behind by
    a failure, and an export being replaced stays whole until the new one is complete."""
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
        write_weights(tmp)
        config.to_json_file(str(tmp / "config.json"))
        if format == "exact":
            (tmp / REMOTE_CODE).write_text(remote_code(config.model_type))
        tokenizer.save_pretrained(tmp)
        full = {"format": "ghostlayers", "format_version": FORMAT_VERSION, "export": format, **manifest}
        full.update(  # what this save wrote wins over what `manifest` (e.g. from an earlier export) says
            format="ghostlayers", format_version=FORMAT_VERSION, export=format, ghost_modules=modules,
            dtype=str(weights_dtype).removeprefix("torch."),
        )
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(full, format, declared_license(str(full.get("base_model") or ""))))
        for file in tmp.iterdir():  # some writers make private files; the export should look like any other folder
            os.chmod(file, 0o666 & ~umask)
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


def save_streaming(
    source: Offloaded,
    pruned: PreTrainedModel,
    plan: Plan,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    format: str = "exact",
    dtype: str = "auto",
) -> Path:
    """`save` for a model larger than memory: `pruned`, built from the skeleton of `source` (an `Offloaded` model)
    by a layer-by-layer prune, its decoder layers still in the dense files except what the run replaced (refitted
    projections, operators). Written one kept layer at a time (peak memory: one layer), each layer read into
    `pruned` by `source.hold` (folds applied) and written as it is there: shard "model-layer-NNNNN.safetensors", the
    embeddings, final norm and LM head (`source.hold_rest`) in "model-rest.safetensors". The same tensors as `save`
    writes for the same model in memory."""
    from safetensors.torch import save_file

    method = (manifest or {}).get("recovery", {}).get("method")
    check_format(format, bool(ghost_modules(pruned)), f"recovery {method!r}" if method else "this model")
    weights_dtype = _weights_dtype(dtype, source.dtype)  # `auto` is the dtype the model ran in, as in `save`
    ad = adapter(pruned)
    prefix = ad.layers_prefix + "."

    def rest() -> dict[str, torch.Tensor]:  # embeddings, final norm (and its operator), LM head unless tied
        with source.hold_rest(pruned):
            tied = ad.lm_head.weight is ad.embed_tokens.weight
            return _weights({k: v for k, v in pruned.state_dict().items()
                             if not k.startswith(prefix) and not (tied and k == "lm_head.weight")}, weights_dtype)

    def layer(new: int, old: int) -> dict[str, torch.Tensor]:
        with source.hold([old]):
            return _weights(ad.layers[new].state_dict(prefix=f"{prefix}{new}."), weights_dtype)

    def write_weights(tmp: Path) -> None:
        weight_map: dict[str, str] = {}
        total = 0
        shards: list[tuple[str, Callable[[], dict[str, torch.Tensor]]]] = [("model-rest.safetensors", rest)]
        shards += [(f"model-layer-{new:05d}.safetensors", lambda new=new, old=old: layer(new, old))
                   for new, old in enumerate(plan.kept)]
        for name, tensors_of in tqdm(shards, desc="writing", unit="shard", leave=False):
            tensors = tensors_of()
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    return _write(out, overwrite, write_weights, _config(pruned, format, weights_dtype), tokenizer,
                  dict(manifest or {}), format, sorted(ghost_modules(pruned)), weights_dtype)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise GhostlayersError(f"{file} is not valid JSON ({err}): the export is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "ghostlayers":
        raise GhostlayersError(f"{file} is not a ghostlayers manifest: the export is corrupted")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise GhostlayersError(
            f"{path} was written in export format {version}, this ghostlayers reads format {FORMAT_VERSION}: "
            + ("upgrade ghostlayers" if newer else "prune the model again with this version")
        )
    return manifest


def weight_files(folder: Path) -> list[str]:
    """The folder's safetensors weight files: one file, or the shards an index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise GhostlayersError(f"{index} is not a valid safetensors index: the export is corrupted") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise GhostlayersError(f"{folder} has no model.safetensors: the export is incomplete")
    return files


def weight_headers(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, dtype) in the folder's safetensors weights, read from the headers only."""
    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in weight_files(folder):
        file = folder / name
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    headers[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except (SafetensorError, OSError) as err:
            raise GhostlayersError(f"cannot read {file} ({err}): the export is truncated or corrupted") from None
    return headers


def check_export(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest, config.json and the weights agree on the layers and operators, before anything is loaded."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GhostlayersError(f"{folder}/config.json is missing or unreadable ({err}): the export is corrupted") from None
    problems = []
    layers = config.get("num_hidden_layers")
    if manifest.get("num_layers_pruned") not in (None, layers):
        problems.append(f"the manifest says {manifest['num_layers_pruned']} layers, config.json {layers}")
    if manifest.get("kept_layers") is not None and len(manifest["kept_layers"]) != layers:
        problems.append(f"the manifest keeps {len(manifest['kept_layers'])} layers, config.json has {layers}")
    listed = sorted(manifest.get("ghost_modules") or [])
    exact = str(config.get("model_type", "")).startswith(runtime.MODEL_TYPE_PREFIX)
    if manifest.get("export") == "exact" and not exact:
        problems.append(f"the manifest says exact but config.json has model_type {config.get('model_type')!r}")
    if manifest.get("export") == "vanilla" and (exact or listed):
        problems.append("the manifest says vanilla but the export has operators")
    declared = config.get("ghost_operators") or {}
    if not isinstance(declared, dict):
        problems.append(f"config.json's ghost_operators is not a mapping of module names to operators: {declared!r}")
        declared = {}
    if exact and sorted(declared) != listed:
        problems.append(f"the manifest lists operators {listed}, config.json {sorted(declared)}")
    if exact and not (folder / REMOTE_CODE).is_file():
        problems.append(f"{REMOTE_CODE} is missing")
    if problems:
        raise GhostlayersError(f"{folder} is corrupted: " + "; ".join(problems))
    hidden = config.get("hidden_size")
    stored = {m: {k: shape for k, (shape, _) in parts.items()} for m, parts in _stored_operators(weight_headers(folder)).items()}
    for name in sorted(set(declared) | set(stored)):
        if name not in stored:
            problems.append(f"operator {name} is missing from the weights")
        elif name not in declared:
            problems.append(f"the weights hold an operator {name} that config.json does not declare")
        else:
            problems += _operator_problems(name, declared[name], stored[name], hidden)
    if problems:
        raise GhostlayersError(f"{folder} is corrupted: " + "; ".join(problems))


def load(path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """Load a model: a ghostlayers export (checked, with its operators), or anything `load_model` takes.

    Returns (model, tokenizer, manifest-or-None). Never runs code from the folder: an exact export is rebuilt with
    this package's own `runtime` classes.
    """
    folder = Path(str(path)).expanduser()
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None:
        check_export(folder, manifest)
    model, tokenizer = load_model(str(path), dtype, device)
    return model, tokenizer, manifest


_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _tensor(folder: Path, key: str) -> torch.Tensor:
    for name in weight_files(folder):
        with safe_open(str(folder / name), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    raise GhostlayersError(f"{key} is not in the weights of {folder}")


def _describe_operator(folder: Path, module: str, parts: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Any]:
    """One operator for `ghostlayers info`: its parts, parameter count, and `shape_of` its linear map W (C×C or C;
    I + down·up for a low-rank one); an affine one adds ‖b‖₂."""
    names = sorted(parts, key=_part_order)
    tensor = lambda part: _tensor(folder, f"{module}.ghost.{part}").double()  # noqa: E731
    out: dict[str, Any] = {
        "module": module,
        "parts": {part: list(parts[part][0]) for part in names},
        "dtype": ", ".join(sorted({dtype for _, dtype in parts.values()})),
        "parameters": sum(int(torch.Size(shape).numel()) for shape, _ in parts.values()),
    }
    if "weight" in parts:
        linear = tensor("weight")
    elif "down" in parts and "up" in parts:
        down = tensor("down")
        linear = torch.eye(down.shape[0], dtype=torch.float64) + down @ tensor("up")
    else:  # not an operator: check_export refuses these in an export
        return out
    out["shape"] = list(linear.shape)
    out.update(shape_of(linear))
    if "down" in parts:
        out.update(kind="low-rank", rank=int(parts["down"][0][1]))
    if "bias" in parts:
        out["bias_norm"] = float(tensor("bias").norm())
    return out


def describe(path: str | Path) -> dict[str, Any]:
    """What `ghostlayers info` prints: how the folder was made, its operators, parameters and size on disk, from
    the manifest, config.json and the safetensors headers (no weights are read)."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise GhostlayersError(f"{path} is not a model folder (no config.json): pass a folder written by ghostlayers prune")
    manifest = read_manifest(folder)
    if manifest is not None:
        check_export(folder, manifest)
    config = json.loads((folder / "config.json").read_text())
    headers = weight_headers(folder)
    count = lambda shape: int(torch.Size(shape).numel())  # noqa: E731
    operators = _stored_operators(headers)
    parameters = sum(count(shape) for k, (shape, _) in headers.items() if ".ghost." not in k)
    operator_parameters = sum(count(shape) for k, (shape, _) in headers.items() if ".ghost." in k)
    weight_dtypes = sorted({dtype for k, (_, dtype) in headers.items() if ".ghost." not in k})
    per_param = max((_BYTES.get(d, 4) for d in weight_dtypes), default=4)
    files = [p for p in folder.rglob("*") if p.is_file()]
    manifest = manifest or {}
    dense = manifest.get("dense_parameters")
    return {
        "path": str(folder),
        "export": manifest.get("export", "not a ghostlayers export"),
        "model_type": config.get("model_type"),
        "base_model": manifest.get("base_model"),
        "layers": {
            "dense": manifest.get("num_layers_dense"),
            "pruned": config.get("num_hidden_layers"),
            "removed": manifest.get("removed_layers"),
        },
        "selection": manifest.get("selection"),
        "recovery": manifest.get("recovery"),
        "operators": [_describe_operator(folder, k, parts) for k, parts in sorted(operators.items())],
        "calibration": manifest.get("calibration"),
        "weights_dtype": weight_dtypes,
        "parameters": {"pruned": parameters, "operators": operator_parameters, "dense": dense},
        "size_bytes": {
            "folder": sum(p.stat().st_size for p in files),
            "weights": sum((folder / name).stat().st_size for name in weight_files(folder)),
            "dense_weights_computed": dense * per_param if dense else None,  # dense parameters at the saved dtype
        },
        "created": manifest.get("created"),
        "versions": manifest.get("versions"),
    }
