"""ghostlayers: remove decoder layers from a Llama-family LLM and recover it without training."""

__version__ = "0.1.0"

from .errors import GhostlayersError  # noqa: E402
from .export import load, save  # noqa: E402

__all__ = ["GhostlayersError", "load", "save", "__version__"]
