"""Nearest-neighbour evaluation on plain embedding tensors (spec section 7).

``soft_nn_predict`` is the PAWS-NN classifier, ``knn_predict`` the weighted k-NN of DINO, and
``topk_accuracy`` scores either. Queries are processed in chunks so that the full query x bank
similarity matrix never exists: a 50k x 128k float32 matrix alone would be 25 GiB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "auto_chunk_size",
    "embed_batches",
    "knn_predict",
    "soft_nn_predict",
    "topk_accuracy",
]

#: Memory allowed for one chunk's (queries x bank) float32 similarity block.
DEFAULT_BLOCK_BYTES = 256 * 2**20

# Same floor as torch.nn.functional.normalize, so a zero embedding maps to zero instead of NaN.
_NORM_EPS = 1e-12


def auto_chunk_size(bank_size: int, budget_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Number of query rows whose float32 similarity block against ``bank_size`` rows fits ``budget_bytes``.

    Always at least 1, so a bank too large for the budget still runs (one query at a time).
    """
    if bank_size <= 0:
        raise ValueError(f"bank_size must be positive, got {bank_size}")
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    return max(1, budget_bytes // (4 * bank_size))


def _check_finite(x: Tensor, name: str) -> None:
    """Raise if the 2-D ``x`` holds NaN or inf, naming the first such row.

    ``torch.isfinite`` on a whole 1 GiB bank would allocate an |x| copy plus masks; a row sum is
    non-finite whenever the row holds NaN/inf, so only rows whose sum is non-finite (or overflowed)
    are inspected element by element, and the check costs one pass and S floats.
    """
    if x.numel() == 0:
        return
    suspects = (~torch.isfinite(x.sum(dim=1, dtype=torch.float32))).nonzero().flatten()
    for row in suspects.tolist():
        if not bool(torch.isfinite(x[row]).all()):
            raise ValueError(
                f"{name} contains non-finite values (first at row {row}); "
                "check the embedding model/inputs for NaN or inf before evaluating"
            )


def _validate(
    queries: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, chunk_size: int | None
) -> None:
    """Shared input checks for both classifiers; messages name the offending argument."""
    for name, t in (("queries", queries), ("bank", bank), ("bank_labels", bank_labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if queries.dim() != 2:
        raise ValueError(f"queries must be 2-D (Q, D), got shape {tuple(queries.shape)}")
    if bank.dim() != 2:
        raise ValueError(f"bank must be 2-D (S, D), got shape {tuple(bank.shape)}")
    if not queries.is_floating_point() or not bank.is_floating_point():
        raise ValueError(f"queries and bank must be floating point, got {queries.dtype} and {bank.dtype}")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty (0 rows): embed the labelled subset before evaluating")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"embedding dimension mismatch: queries have D={queries.shape[1]}, bank has D={bank.shape[1]}"
        )
    if bank_labels.dim() != 1 or bank_labels.shape[0] != bank.shape[0]:
        raise ValueError(
            f"bank_labels must be 1-D with one label per bank row ({bank.shape[0]}), "
            f"got shape {tuple(bank_labels.shape)}"
        )
    if bank_labels.is_floating_point() or bank_labels.is_complex() or bank_labels.dtype == torch.bool:
        raise ValueError(f"bank_labels must be an integer tensor, got {bank_labels.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    lo, hi = int(bank_labels.min()), int(bank_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"bank_labels must lie in [0, num_classes={num_classes}), found values in [{lo}, {hi}]"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if len({queries.device, bank.device, bank_labels.device}) != 1:
        raise ValueError(
            f"queries, bank and bank_labels must be on one device, got {queries.device}, "
            f"{bank.device}, {bank_labels.device}"
        )
    _check_finite(queries, "queries")
    _check_finite(bank, "bank")


def _prepare_bank(bank: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """Return the bank in float32 and, if normalising, the inverse row norms.

    The bank is not normalised into a copy: dividing each similarity column by the bank norm gives
    the same cosine and saves a second bank-sized buffer (1 GiB for 128k x 2048).
    """
    bank32 = bank if bank.dtype == torch.float32 else bank.float()
    if not normalize:
        return bank32, None
    norms = torch.linalg.vector_norm(bank32, dim=1).clamp_min_(_NORM_EPS)
    return bank32, norms.reciprocal_()


def _similarity_block(q: Tensor, bank32: Tensor, inv_bank_norm: Tensor | None, scale: float) -> Tensor:
    """``scale * normalize(q) @ normalize(bank).T`` (or the raw dot product) for one query chunk."""
    q32 = q.float()
    if inv_bank_norm is not None:
        q32 = q32 / torch.linalg.vector_norm(q32, dim=1, keepdim=True).clamp_min(_NORM_EPS)
    # Scaling the small query chunk is cheaper than scaling the (chunk x S) block afterwards.
    sims = (q32 * scale) @ bank32.T
    if inv_bank_norm is not None:
        sims.mul_(inv_bank_norm)
    return sims


def soft_nn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    *,
    tau: float = 0.1,
    chunk_size: int | None = None,
    normalize: bool = True,
) -> Tensor:
    """PAWS-NN: ``softmax(normalize(q) @ normalize(bank).T / tau) @ onehot(bank_labels)``.

    Args:
        queries: (Q, D) query embeddings (any float dtype; computed in float32).
        bank: (S, D) labelled support embeddings.
        bank_labels: (S,) integer labels in ``[0, num_classes)``.
        num_classes: C, the width of the output.
        tau: softmax temperature (0.1 in the paper).
        chunk_size: query rows per chunk; ``None`` picks the largest chunk whose float32
            similarity block stays under ``DEFAULT_BLOCK_BYTES``.
        normalize: L2-normalise queries and bank (cosine similarity); ``False`` uses raw dot products.

    Returns:
        (Q, C) float32 class probabilities on the queries' device; every row sums to 1.
    """
    _validate(queries, bank, bank_labels, num_classes, chunk_size)
    if not (tau > 0 and tau != float("inf")):
        raise ValueError(f"tau must be a positive finite float, got {tau!r}")
    num_bank = bank.shape[0]
    chunk = chunk_size if chunk_size is not None else auto_chunk_size(num_bank)
    bank32, inv_norm = _prepare_bank(bank, normalize)
    labels = bank_labels.long()
    out = torch.empty(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        logits = _similarity_block(queries[start : start + chunk], bank32, inv_norm, 1.0 / tau)
        # Softmax in place on the one block we hold; the max shift keeps exp() from overflowing.
        logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
        # index_add_ over columns sums each bank column into its class without the (S, C) one-hot
        # (512 MiB for 128k x 1000), and measured faster than a dense or sparse one-hot matmul.
        scores = torch.zeros(logits.shape[0], num_classes, dtype=torch.float32, device=logits.device)
        scores.index_add_(1, labels, logits)
        # Every bank column lands in exactly one class, so the class sums add up to the softmax
        # denominator: normalising the (chunk, C) scores is cheaper than the (chunk, S) block.
        out[start : start + chunk] = scores / scores.sum(dim=1, keepdim=True)
        # Drop the block now: otherwise it stays alive while the next one is computed (2x memory).
        del logits
    return out


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> Tensor:
    """Weighted k-NN (DINO protocol): class score = sum of ``exp(cos / temperature)`` over the top-k.

    Args:
        queries: (Q, D) query embeddings.
        bank: (S, D) labelled embeddings; cosine similarity is used (both sides are normalised).
        bank_labels: (S,) integer labels in ``[0, num_classes)``.
        num_classes: C, the width of the output.
        k: neighbours per query; must satisfy ``1 <= k <= S``.
        temperature: weight temperature T.
        chunk_size: query rows per chunk; ``None`` bounds the similarity block as in ``soft_nn_predict``.

    Returns:
        (Q, C) float32 unnormalised class scores (zero for classes without a neighbour).
    """
    _validate(queries, bank, bank_labels, num_classes, chunk_size)
    num_bank = bank.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > num_bank:
        raise ValueError(f"k={k} is larger than the bank ({num_bank} rows): use k <= {num_bank}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    chunk = chunk_size if chunk_size is not None else auto_chunk_size(num_bank)
    bank32, inv_norm = _prepare_bank(bank, normalize=True)
    labels = bank_labels.long()
    out = torch.empty(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        sims = _similarity_block(queries[start : start + chunk], bank32, inv_norm, 1.0)
        top_sims, top_idx = sims.topk(k, dim=1)
        del sims  # free the (chunk, S) block before allocating the outputs
        weights = top_sims.div_(temperature).exp_()
        scores = torch.zeros(weights.shape[0], num_classes, dtype=torch.float32, device=weights.device)
        scores.scatter_add_(1, labels[top_idx], weights)
        out[start : start + chunk] = scores
    return out


def topk_accuracy(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each ``k`` in ``ks``.

    With fewer classes than ``k`` every target is within the top ``C`` classes, so such a k is
    evaluated as top-C (100.0). Ties between scores are broken by ``torch.topk``.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (Q, C) tensor, got {getattr(scores, 'shape', type(scores))}")
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets must be 1-D with one entry per score row ({scores.shape[0]}), "
            f"got {getattr(targets, 'shape', type(targets))}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    num_queries, num_classes = scores.shape
    if num_queries == 0 or num_classes == 0:
        raise ValueError(f"accuracy of an empty score matrix {tuple(scores.shape)} is undefined")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; the ranking would be meaningless")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"targets must lie in [0, C={num_classes}), found values in [{lo}, {hi}]")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    max_k = min(max(ks), num_classes)
    ranked = scores.topk(max_k, dim=1).indices  # (Q, max_k), best first
    hits = ranked.eq(targets.to(ranked.device).long().unsqueeze(1))
    result: dict[int, float] = {}
    for k in ks:
        correct = hits[:, : min(k, num_classes)].any(dim=1).sum().item()
        result[k] = 100.0 * correct / num_queries
    return result


def embed_batches(
    fn: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Run ``fn`` over ``images`` in batches under ``torch.inference_mode``; return (N, D) float32 on CPU.

    ``fn`` is called on slices of ``images`` (moved to ``device`` first when given) and must return a
    (batch, D) tensor. Putting a model in eval mode is the caller's job. The output is preallocated
    after the first batch, so peak memory is one output plus one batch, not two outputs.
    """
    if not isinstance(images, Tensor) or images.dim() < 1 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty tensor with a batch dimension, got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    num = images.shape[0]
    out: Tensor | None = None
    with torch.inference_mode():
        for start in range(0, num, batch_size):
            batch = images[start : start + batch_size]
            where = f"images[{start}:{start + batch.shape[0]}]"
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            emb = fn(batch)
            if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"fn must return a ({batch.shape[0]}, D) tensor for {where}, "
                    f"got {getattr(emb, 'shape', type(emb))}"
                )
            emb = emb.detach().to("cpu", torch.float32)
            if out is None:
                out = torch.empty(num, emb.shape[1], dtype=torch.float32)
            elif emb.shape[1] != out.shape[1]:
                raise ValueError(
                    f"fn returned D={emb.shape[1]} for {where} but D={out.shape[1]} for earlier batches"
                )
            if not bool(torch.isfinite(emb).all()):
                raise ValueError(f"fn returned non-finite embeddings for {where}")
            out[start : start + batch.shape[0]] = emb
    assert out is not None  # num > 0 guarantees at least one batch
    return out
