"""Prefill and decode of one checkpoint through the transformers engine's loader, in each compute dtype.

    python -m steerserve.benchmarks.compute_dtype runs/q/nf4 runs/q/int8 --output runs/bench/compute-dtype

Why: on a CPU without native bf16 the engine computes float and bitsandbytes variants in float32
(``steerserve.precision.compute_dtype_name``); this measures what that choice buys per checkpoint,
on the same weights and prompt, so the rule rests on numbers from the machine at hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DTYPES = ("bfloat16", "float32")


def measure(path: Path, dtype: str, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Seconds for one prefill of ``prompt_tokens`` and greedy decode tok/s over ``new_tokens``."""
    import torch

    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_model
    from steerserve.server.variants import read_manifest

    precision = Precision(read_manifest(path).get("precision", "bf16"))
    model = load_model(str(path), EngineConfig(model=str(path), precision=precision), compute_dtype=dtype)
    prompt = torch.randint(100, model.config.vocab_size - 100, (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(prompt[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        model(prompt)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(prompt[:, :20], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decode = new_tokens / (time.perf_counter() - started)
    return {"precision": precision.value, "prefill_s": round(prefill, 3), "decode_tok_s": round(decode, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steerserve.benchmarks.compute_dtype", description=__doc__)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=492)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for checkpoint in args.checkpoints:
        for dtype in DTYPES:
            rows.append({"checkpoint": str(checkpoint), "compute_dtype": dtype,
                         **measure(checkpoint, dtype, args.prompt_tokens, args.new_tokens)})
            print(json.dumps(rows[-1]), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    from steerserve.benchmarks.report import environment

    payload = {"args": vars(args), "environment": environment(), "rows": rows}
    (args.output / "compute_dtype.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = [f"| checkpoint | compute dtype | prefill of {args.prompt_tokens} tokens (s) | decode tok/s |",
             "|---|---|---|---|"]
    lines += [f"| {Path(r['checkpoint']).name} ({r['precision']}) | {r['compute_dtype']} | {r['prefill_s']} | "
              f"{r['decode_tok_s']} |" for r in rows]
    (args.output / "compute_dtype.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
