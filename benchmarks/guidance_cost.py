"""What reading-level guidance costs a vLLM engine: unguided requests, guided inside the engine, guided as a map.

    python -m steerserve.benchmarks.guidance_cost runs/steered-default/q/bf16 --output runs/bench/guidance-cost

Why: the complexity slider's bias covers most of the vocabulary. Sent as an OpenAI ``logit_bias`` map, vLLM
rebuilds its bias index from every running request's map (~34,000 entries each) whenever the batch changes;
the engine's reading-level processor (``server/engines/vllm_reading_level.py``) gets two numbers per request
and adds one dense row per request instead. One in-process engine serves three kinds of the same load -
no guidance, complexity 0 guided by the processor, complexity 0 as the equivalent ``logit_bias`` map - in
interleaved rounds (machines are noisy: compare within a round). Requests ask for different lengths so they
finish at different steps and the batch changes often, as under real traffic; greedy, so the two guided kinds
decode the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

MODES = ("unguided", "processor", "map")


async def _round(engine: Any, prompt_ids: list[int], mode: str, biases: dict[str, Any], requests: int,
                 lengths: tuple[int, int]) -> dict[str, float]:
    from steerserve.server.engines.base import EngineRequest, SamplingOptions

    low, high = lengths
    guided = {"processor": {"guidance": biases["tagged"]}, "map": {"logit_bias": biases["map"]}}.get(mode, {})

    async def one(i: int) -> int:
        options = SamplingOptions(max_tokens=low + (high - low) * i // max(requests - 1, 1), temperature=0.0,
                                  ignore_eos=True, **guided)
        request = EngineRequest(f"{mode}-{time.monotonic_ns()}-{i}", prompt_ids, options)
        return sum([delta.token_count async for delta in engine.generate(request)])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "tokens": tokens, "tok_s": round(tokens / seconds, 1)}


async def measure(path: Path, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Rounds of the three modes on one engine; a warm-up round of each first (not counted)."""
    from transformers import AutoTokenizer

    from steerserve.precision import Precision
    from steerserve.reading_level import guide_for
    from steerserve.server.engines.base import EngineConfig, LogitBias
    from steerserve.server.engines.vllm_engine import VLLMEngine
    from steerserve.server.variants import read_manifest

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bias = guide_for(tokenizer).logit_bias(0, args.strength)
    biases = {"tagged": LogitBias.of(bias, (0, args.strength)), "map": LogitBias.of(bias)}
    precision = Precision(read_manifest(path).get("precision", "bf16"))
    engine = VLLMEngine(EngineConfig(model=str(path), precision=precision, max_model_len=1024,
                                     max_num_seqs=args.max_num_seqs, reading_level_guidance=args.strength))
    await engine.start()
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        lengths = (args.min_tokens, args.max_tokens)
        for mode in MODES:
            await _round(engine, prompt_ids, mode, biases, min(args.requests, 4), lengths)
        for number in range(args.rounds):
            for mode in MODES:
                results[mode].append(await _round(engine, prompt_ids, mode, biases, args.requests, lengths))
                print(json.dumps({"round": number, "mode": mode, **results[mode][-1]}), flush=True)
    finally:
        await engine.shutdown()
    return results


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Median tokens/s per mode and its ratio to unguided, from the same rounds."""
    median = {mode: statistics.median(r["tok_s"] for r in rows) for mode, rows in results.items()}
    lines = ["| requests | median tok/s | vs unguided | rounds (tok/s) |", "|---|---|---|---|"]
    lines += [f"| {mode} | {median[mode]:.1f} | {median[mode] / median['unguided']:.2f} | "
              f"{', '.join(str(r['tok_s']) for r in rows)} |" for mode, rows in results.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steerserve.benchmarks.guidance_cost", description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=32, help="requests per round, all sent at once")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="vLLM batch size")
    parser.add_argument("--min-tokens", type=int, default=16, help="shortest answer of a round")
    parser.add_argument("--max-tokens", type=int, default=96, help="longest answer of a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strength", type=float, default=2.0, help="guidance strength (the server's default)")
    parser.add_argument("--prompt", default="Explain how a rainbow forms.")
    args = parser.parse_args(argv)
    from steerserve.server.engines.vllm_args import configure_cpu_threads

    configure_cpu_threads()
    results = asyncio.run(measure(args.checkpoint, args))
    from steerserve.benchmarks.report import environment

    args.output.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "environment": environment(), "results": results}
    (args.output / "guidance_cost.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (args.output / "guidance_cost.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
