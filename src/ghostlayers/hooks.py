"""Every forward hook ghostlayers installs goes through `hooked`: registered for the duration of a `with` block and
removed on every path out of it (an exception included). Hooks only read what a module receives or returns during
a pass (and, for the loss criteria, replace what one receives); what must survive a save is a real module
(`runtime.GhostOperator`), never a hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from torch import Tensor, nn

When = Literal["input", "output"]


class Stop(Exception):
    """Raised by a hook once it has what it came for, to skip the rest of a forward pass."""


@contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, When, Callable[..., Any]]]) -> Iterator[None]:
    """For the duration, each (module, when, fn): "input" calls fn(module, args, kwargs) before the module runs (it
    may return (args, kwargs) to replace them), "output" calls fn(module, args, output) after it."""
    handles = []
    try:
        for module, when, fn in hooks:
            if when == "input":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            elif when == "output":
                handles.append(module.register_forward_hook(fn))
            else:
                raise ValueError(f"internal: a hook runs on a module's input or output, not {when!r}")
        yield
    finally:
        for handle in handles:
            handle.remove()


def received(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The hidden state a decoder layer (or a norm) was called with, positionally or as `hidden_states`."""
    return args[0] if args else kwargs["hidden_states"]


def until_stop(run: Callable[[], Any]) -> None:
    """Run a forward pass that a hook may cut short with `Stop`."""
    try:
        run()
    except Stop:
        pass
