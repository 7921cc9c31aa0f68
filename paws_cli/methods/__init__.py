"""Training methods as plug-ins: what is specific to a method (its settings section, the data it needs, its model,
loss, per-step hook and state) lives in one module that registers itself with ``@register_method``; data,
samplers, models, optimiser, loop, checkpoints and evaluation are shared. Methods of other packages register
through the entry-point group ``paws_cli.methods``.
"""

from __future__ import annotations

from paws_cli.config.schema import Settings
from paws_cli.method_registry import method_class, method_names, register_method
from paws_cli.methods.base import Method, encoder_of
from paws_cli.methods.paws import PAWSMethod
from paws_cli.methods.semppl import SemPPLMethod
from paws_cli.methods.supervised import SupervisedMethod


def create_method(settings: Settings, in_chans: int, num_classes: int) -> Method:
    """The method named by settings.method."""
    return method_class(settings.method)(settings, in_chans=in_chans, num_classes=num_classes)


__all__ = [
    "Method",
    "PAWSMethod",
    "SemPPLMethod",
    "SupervisedMethod",
    "create_method",
    "encoder_of",
    "method_class",
    "method_names",
    "register_method",
]
