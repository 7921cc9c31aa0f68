"""Training methods: what is specific to one method (its model heads, targets and loss) lives here; data,
samplers, models, optimiser, loop and evaluation are shared. SemPPL will be added as another module."""

from __future__ import annotations

from paws_cli.config.schema import Settings
from paws_cli.methods.base import Method
from paws_cli.methods.paws import PAWSMethod
from paws_cli.methods.supervised import SupervisedMethod

METHODS: dict[str, type[Method]] = {"paws": PAWSMethod, "supervised": SupervisedMethod}


def create_method(settings: Settings, in_chans: int, num_classes: int) -> Method:
    """The method named by settings.method."""
    return METHODS[settings.method](settings, in_chans=in_chans, num_classes=num_classes)


__all__ = ["METHODS", "Method", "PAWSMethod", "SupervisedMethod", "create_method"]
