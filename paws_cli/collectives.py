"""torch.distributed helpers shared by every method: world info and collectives with the right gradients.

Every function is the identity (or a plain local op) when torch.distributed is not initialised, so the
single-process path runs the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is up and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0, the process that writes files and logs."""
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every process's gradient and returns each its own slice.

    torch.distributed.nn.all_gather exists but returns a tuple and has had backward bugs across releases;
    this is the small, explicit version the method needs (PAWS gathers supports *with* gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _MeanWithIdentityGrad(torch.autograd.Function):
    """All-reduce mean whose backward passes the gradient through unchanged.

    With DDP averaging parameter gradients over W processes, an identity backward is what makes a term of the
    *global* mean (the me-max regulariser) receive exactly its single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes in rank order; gradients flow back to each process's own rows."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes in rank order, without gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over processes (identity gradient, see _MeanWithIdentityGrad)."""
    return _MeanWithIdentityGrad.apply(x) if is_distributed() else x


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo is given CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def mean_over_processes(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Every logged scalar averaged over processes, in one collective (plain floats out).

    Every process must call it at the same point with the same keys.
    """
    if not values:
        return {}
    if not is_distributed():
        return {key: float(value) for key, value in values.items()}
    device = _collective_device()
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values.values()])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(values, (stacked / dist.get_world_size()).tolist(), strict=True))


@torch.no_grad()
def max_over_processes(values: list[torch.Tensor | float]) -> list[float]:
    """The element-wise maximum over processes, in one collective: what every process must decide alike
    (stop now? is any loss non-finite?) is decided on the same numbers."""
    if not is_distributed():
        return [float(v) for v in values]
    device = _collective_device()
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return stacked.tolist()
