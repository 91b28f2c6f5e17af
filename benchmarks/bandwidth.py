"""This machine's memory bandwidth, and the single-stream decode ceiling it sets per precision.

    python -m steerserve.benchmarks.bandwidth --output runs/bench/bandwidth

One decoded token reads every weight once, so one stream cannot decode faster than
bandwidth / weight bytes. The read bandwidth is measured the way a matrix-vector product
streams weights: a reduction over a buffer far larger than the caches, in the engines' own
thread count (torch's intra-op threads, one per core), best of several passes. Issue 9's
"60% of the bandwidth ceiling" is measured against these ceilings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30


def weight_bytes(checkpoint: Path, ggufs: list[Path]) -> dict[str, int]:
    """Bytes one token reads: the checkpoint's parameters in float32 and bf16, and each GGUF file's size
    (tied embeddings are stored, and read for the output projection, once)."""
    from safetensors import safe_open

    parameters = 0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as weights:
            for name in weights.keys():
                count = 1
                for size in weights.get_slice(name).get_shape():
                    count *= size
                parameters += count
    sizes = {"float32": parameters * 4, "bf16": parameters * 2}
    sizes.update({gguf.parent.name if gguf.is_file() else gguf.name: gguf.stat().st_size for gguf in ggufs})
    return sizes


def read_bandwidth(buffer_bytes: int, passes: int) -> dict[str, float]:
    """Best and median GB/s of summing a float32 buffer of ``buffer_bytes`` (a read-only stream)."""
    import torch

    buffer = torch.ones(buffer_bytes // 4, dtype=torch.float32)
    buffer.sum()  # fault the pages in
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        buffer.sum()
        rates.append(buffer_bytes / (time.perf_counter() - started) / 1e9)
    rates.sort()
    return {"best_gb_s": rates[-1], "median_gb_s": rates[len(rates) // 2], "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steerserve.benchmarks.bandwidth", description=__doc__)
    parser.add_argument("--buffer-gib", type=float, default=1.0)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--checkpoint", type=Path, help="float checkpoint (default: the default model's)")
    parser.add_argument("--gguf", type=Path, action="append", default=[], help="a GGUF file to size too (repeat)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    from steerserve.benchmarks.report import environment
    from steerserve.default_model import CACHE_DIR, default_model_dir

    checkpoint = args.checkpoint or default_model_dir(CACHE_DIR)
    sizes = weight_bytes(checkpoint, args.gguf)
    measured = read_bandwidth(int(args.buffer_gib * GIB), args.passes)
    ceilings = {name: measured["best_gb_s"] * 1e9 / size for name, size in sizes.items()}
    payload: dict[str, Any] = {"environment": environment(), "read": measured, "checkpoint": str(checkpoint),
                               "weight_bytes": sizes, "single_stream_ceiling_tok_s": ceilings}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bandwidth.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = [f"Read bandwidth: {measured['best_gb_s']:.1f} GB/s best, {measured['median_gb_s']:.1f} median "
             f"({measured['threads']} threads, {args.buffer_gib:g} GiB buffer, {args.passes} passes)", "",
             "| weights | bytes per token | single-stream ceiling tok/s | 60% of it |", "|---|---|---|---|"]
    lines += [f"| {name} | {sizes[name] / 2**20:.0f} MiB | {rate:.0f} | {0.6 * rate:.0f} |"
              for name, rate in ceilings.items()]
    (args.output / "bandwidth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
