"""ghostlayers: remove decoder layers from a Llama-family LLM and recover it without training."""

from .errors import GhostlayersError
from .version import __version__

__all__ = ["GhostlayersError", "PruneSpec", "Result", "load", "prune", "save", "__version__"]


def __getattr__(name: str):
    """`ghostlayers.prune`, `PruneSpec`, `Result`, `load` and `save`, imported on first use: `import ghostlayers`
    (and so `ghostlayers --help`) stays free of torch and transformers."""
    if name in ("load", "save"):
        from . import export

        return getattr(export, name)
    if name in ("prune", "PruneSpec", "Result"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ghostlayers' has no attribute {name!r}")
