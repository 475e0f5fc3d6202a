"""Cached calibration states kept on disk instead of in memory, for runs whose states do not fit (`--spill-dir`).

The layer-by-layer pass and the refit's walk cache the residual stream of every calibration window (one copy, and
three in the walk). `Spill(folder)` is a function that returns a copy of a tensor backed by a memory-mapped file in
`folder`: its pages are written back to the file and the kernel can drop them from memory, so the states cost disk,
not memory. Each file is unlinked as soon as it is mapped, so nothing is left behind whatever happens: the disk space
returns when the tensor is freed. Values are the same bits as in memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .errors import GhostlayersError


class Spill:
    """`spill(t)`: `t` copied into a memory-mapped file of `folder` (CPU tensors; others are kept as they are)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GhostlayersError(f"cannot spill calibration states to {self.folder}: {err.strerror or err}") from None

    def __call__(self, tensor: Tensor) -> Tensor:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return tensor
        try:
            fd, path = tempfile.mkstemp(prefix=".ghostlayers-spill-", dir=self.folder)
            os.close(fd)
        except OSError as err:
            raise GhostlayersError(f"cannot spill calibration states to {self.folder}: {err.strerror or err}") from None
        try:
            out = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        except RuntimeError as err:
            raise GhostlayersError(f"cannot spill calibration states to {self.folder}: {err}") from None
        finally:
            os.unlink(path)  # the mapping stays; the disk space returns when the tensor is freed
        return out.view(tensor.shape).copy_(tensor)


def keeper(folder: str | Path | None):
    """The function that keeps a cached state: as it is (None), or spilled to `folder`."""
    return (lambda tensor: tensor) if folder is None else Spill(folder)
