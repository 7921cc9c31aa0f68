"""Projection and prediction MLP heads of PAWS (spec section 4).

- ``ProjectionHead``: Linear-BN-ReLU blocks then a final Linear; its first block is exposed as ``first``
  because SimCLRv2-style fine-tuning keeps the backbone plus that block.
- ``PredictionHead``: BN(D)-Linear(D, hidden)-BN-ReLU-Linear(hidden, D), the bottleneck used on ImageNet.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["PredictionHead", "ProjectionHead"]


def _positive_dim(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _linear_bn_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("fc", nn.Linear(in_dim, out_dim)),
                ("bn", nn.BatchNorm1d(out_dim)),
                ("act", nn.ReLU(inplace=True)),
            ]
        )
    )


class ProjectionHead(nn.Module):
    """MLP ``in_dim -> hidden_dim -> ... -> out_dim`` with BatchNorm and ReLU after every hidden Linear.

    ``num_layers`` counts the Linear layers: 3 gives
    Linear(in, hidden)-BN-ReLU-Linear(hidden, hidden)-BN-ReLU-Linear(hidden, out) (the PAWS ResNet head),
    2 drops the middle block, and more than 3 adds further hidden blocks.

    Attributes:
        first: the first Linear-BN-ReLU block (kept when fine-tuning).
        middle: the hidden Linear-BN-ReLU blocks after ``first`` (empty for ``num_layers=2``).
        last: the output Linear layer (no normalisation or activation after it).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        _positive_dim("in_dim", in_dim)
        _positive_dim("hidden_dim", hidden_dim)
        _positive_dim("out_dim", out_dim)
        if not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(
                f"ProjectionHead num_layers must be an integer >= 2, got {num_layers!r} "
                "(to run without a projection head, use 0 projection layers in create_encoder)"
            )
        self.in_dim, self.hidden_dim, self.out_dim, self.num_layers = in_dim, hidden_dim, out_dim, num_layers
        self.first = _linear_bn_relu(in_dim, hidden_dim)
        self.middle = nn.Sequential(*[_linear_bn_relu(hidden_dim, hidden_dim) for _ in range(num_layers - 2)])
        self.last = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Project (N, in_dim) features to (N, out_dim)."""
        return self.last(self.middle(self.first(x)))


class PredictionHead(nn.Sequential):
    """BN(dim)-Linear(dim, hidden)-BN(hidden)-ReLU-Linear(hidden, dim), applied to the projection output.

    Submodules are named ``bn_in``, ``fc1``, ``bn1``, ``act``, ``fc2``.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        _positive_dim("dim", dim)
        _positive_dim("hidden_dim", hidden_dim)
        super().__init__(
            OrderedDict(
                [
                    ("bn_in", nn.BatchNorm1d(dim)),
                    ("fc1", nn.Linear(dim, hidden_dim)),
                    ("bn1", nn.BatchNorm1d(hidden_dim)),
                    ("act", nn.ReLU(inplace=True)),
                    ("fc2", nn.Linear(hidden_dim, dim)),
                ]
            )
        )
        self.dim, self.hidden_dim = dim, hidden_dim
