"""Wall time and peak memory of PAWS-NN evaluation at ImageNet-10% scale.

Not a test: run it by hand. The defaults are the full-size case, a 131072 x 2048 labelled bank
(about the 128,116-image 10% split) and 50,000 queries (the ImageNet validation set), so it checks
that chunked evaluation keeps memory near the size of the inputs rather than the 25 GiB that the
whole query x bank similarity matrix would take. Pass smaller ``--bank/--queries`` for a quick run.

    python benchmarks/knn_memory.py                       # full size (several minutes on 2 cores)
    python benchmarks/knn_memory.py --bank 16384 --queries 4096
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from paws_cli.eval.neighbours import DEFAULT_BLOCK_BYTES, auto_chunk_size, soft_nn_predict

_MIB = 2**20


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=int, default=131072, help="labelled bank rows S (default: 131072)")
    p.add_argument("--queries", type=int, default=50000, help="query rows Q (default: 50000)")
    p.add_argument("--dim", type=int, default=2048, help="embedding dimension D (default: 2048)")
    p.add_argument("--classes", type=int, default=1000, help="number of classes C (default: 1000)")
    p.add_argument("--tau", type=float, default=0.1, help="softmax temperature (default: 0.1)")
    p.add_argument("--chunk-size", type=int, default=None, help="query rows per chunk (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("bank", "queries", "dim", "classes"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build a random bank and queries, time ``soft_nn_predict`` on them and print the figures."""
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    rss_start = _peak_rss_mib()
    # Generated on the CPU with a seeded generator so runs are comparable across devices.
    bank = torch.randn(args.bank, args.dim, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.bank,), generator=g).to(device)
    queries = torch.randn(args.queries, args.dim, generator=g).to(device)
    input_mib = (bank.numel() + queries.numel()) * 4 / _MIB
    output_mib = args.queries * args.classes * 4 / _MIB
    chunk = args.chunk_size or auto_chunk_size(args.bank)
    rss_inputs = _peak_rss_mib()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    probs = soft_nn_predict(queries, bank, labels, args.classes, tau=args.tau, chunk_size=args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    rss_end = _peak_rss_mib()

    row_err = (probs.sum(dim=1) - 1).abs().max().item()
    print(f"bank {args.bank} x {args.dim}, queries {args.queries}, classes {args.classes}, device {device}")
    print(
        f"threads {torch.get_num_threads()}, chunk {chunk} queries "
        f"(block {chunk * args.bank * 4 / _MIB:.0f} MiB, budget {DEFAULT_BLOCK_BYTES / _MIB:.0f} MiB)"
    )
    print(
        f"inputs {input_mib:.0f} MiB, output {output_mib:.0f} MiB, "
        f"full similarity matrix would be {args.queries * args.bank * 4 / _MIB:.0f} MiB"
    )
    print(f"wall time {wall:.2f} s ({args.queries / wall:.0f} queries/s)")
    print(
        f"peak RSS: {rss_end:.0f} MiB total; {rss_inputs - rss_start:.0f} MiB for the inputs, "
        f"{rss_end - rss_inputs:.0f} MiB more during soft_nn_predict"
    )
    if device.type == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated(device) / _MIB
        print(f"peak CUDA memory during soft_nn_predict {cuda_peak:.0f} MiB")
    print(f"max |row sum - 1| = {row_err:.2e}")


if __name__ == "__main__":
    main()
