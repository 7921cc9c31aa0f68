"""Method losses on plain tensors. Each method's loss lives in its own module."""

from paws_cli.losses.paws import (
    PAWSLossTerms,
    paws_health,
    paws_loss,
    paws_loss_terms,
    paws_targets,
    sharpen,
    snn,
    support_label_matrix,
)
from paws_cli.losses.semppl import SemPPLLossTerms, semppl_loss

__all__ = [
    "PAWSLossTerms",
    "SemPPLLossTerms",
    "paws_health",
    "paws_loss",
    "paws_loss_terms",
    "paws_targets",
    "semppl_loss",
    "sharpen",
    "snn",
    "support_label_matrix",
]
