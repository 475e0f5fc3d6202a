"""No recovery: the layers are just removed."""

from __future__ import annotations

from .base import Recovery, register


@register
class NoRecovery(Recovery):
    name = "none"
    help = "just remove the layers"
    placement = "nothing"
    at_boundary = False
