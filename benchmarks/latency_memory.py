"""Latency and memory per variant over HTTP, as ratios to reference runtimes measured in the same run.

    steerserve bench latency_memory --variant default --variant default,engine=transformers --output results/bench

Per variant: single-stream tokens/s (and decode-only tokens/s after the first
token), TTFT for the short prompt and for a cold ~500-token one, total tokens/s
with N concurrent streams, weight bytes and peak process-tree RSS (sampled from
``/metrics`` during the run). References, run
after the servers have stopped so nothing shares the cores: HF ``generate`` on
the same checkpoint, and llama.cpp on the default model's GGUF when installed.
Every request forces exactly ``--max-tokens`` tokens (``ignore_eos``), greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx

from steerserve.benchmarks.report import figure, markdown_table
from steerserve.benchmarks.servers import BenchTarget, MemorySampler
from steerserve.clients.loadgen.runner import PlannedRequest, RequestRecord, Target, send

NAME = "latency_memory"
PROMPT = "Explain how a refrigerator keeps food cold, step by step."
MiB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("latency_memory")
    group.add_argument("--max-tokens", type=int, help="tokens per request (default 128; quick 16)")
    group.add_argument("--concurrency", type=int, help="concurrent streams for the batched figure (default 8; quick 4)")
    group.add_argument("--repeats", type=int, help="repetitions of the single stream, the batch and the long prompt (default 3; quick 1)")
    group.add_argument("--prompt-tokens", type=int,
                       help="prompt length for the long-prompt TTFT (default 500; quick 64)")
    group.add_argument("--no-references", action="store_true",
                       help="skip the references (HF generate, llama.cpp, vLLM offline and async)")


def sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(max_tokens, concurrency, repeats): flags, else the quick or full defaults."""
    quick = (16, 4, 1) if args.quick else (128, 8, 3)
    return (args.max_tokens or quick[0], args.concurrency or quick[1], args.repeats or quick[2])


_FILLER = ("A refrigerator moves heat from the cold inside to the warm room: the compressor squeezes the "
           "refrigerant gas, the coils at the back let that heat go, the expansion valve drops the pressure, "
           "and the evaporator inside takes heat from the food as the liquid boils again. ").split()


def long_prompt(tokens: int, index: int) -> str:
    """About ``tokens`` tokens of prose, different from the first word on for each ``index``.

    A distinct start keeps one repeat from reusing another's cached prefix, so the figure is a
    cold prefill. English prose runs at about 1.3 tokens per word in the default tokenizer.
    """
    words = max(1, int(tokens / 1.3))
    body = " ".join(_FILLER[i % len(_FILLER)] for i in range(words))
    return f"Note {index}: {body}\nSummarise the note in one sentence."


def prompt_tokens(args: argparse.Namespace) -> int:
    return args.prompt_tokens or (64 if args.quick else 500)


_API_CPU = re.compile(r"^process_cpu_seconds_total ([0-9.eE+-]+)$", re.MULTILINE)


def _cores(before: dict[str, float], wall: float, api_after: float) -> dict[str, float]:
    """Cores the benchmark's own client and the server's API process kept busy over ``wall`` seconds: on a
    machine where the engine's threads want every core, this much of the machine was not the engine's. (vLLM's
    engine runs in its own process; the transformers and llama.cpp engines inside the API process.)"""
    return {"client": (time.process_time() - before["client"]) / wall,
            "api_process": (api_after - before["api_process"]) / wall}


async def _streams(target: BenchTarget, max_tokens: int, concurrency: int, repeats: int,
                   prompt_tokens: int) -> dict[str, Any]:
    """Warm-up, ``repeats`` single streams one after another, ``repeats`` times ``concurrency`` streams at
    once, then ``repeats`` cold long prompts one at a time (time to first token)."""
    where = Target(model=target.model, url=target.url)

    async def one(http: httpx.AsyncClient, tokens: int, prompt: str = PROMPT) -> RequestRecord:
        record = RequestRecord(0, target.label, None)
        await send(http, PlannedRequest(0, where, prompt, None, tokens, ignore_eos=True), record)
        if not record.success:
            raise RuntimeError(f"{target.label}: {record.error}")
        return record

    async def api_cpu_seconds(http: httpx.AsyncClient) -> float:
        """CPU seconds the server's API process has used (its engine processes not included)."""
        match = _API_CPU.search((await http.get(f"{target.url}/metrics")).text)
        return float(match.group(1)) if match else float("nan")

    async with httpx.AsyncClient(timeout=600) as http:
        await one(http, 4)
        cpu = {"client": time.process_time(), "api_process": await api_cpu_seconds(http)}
        start = time.perf_counter()
        singles = [await one(http, max_tokens) for _ in range(repeats)]
        single_cpu = _cores(cpu, time.perf_counter() - start, await api_cpu_seconds(http))
        batch, wall = [], 0.0
        cpu = {"client": time.process_time(), "api_process": await api_cpu_seconds(http)}
        for _ in range(repeats):  # one batch moves ±7-11% between runs; the mean of several moves less
            start = time.perf_counter()
            batch += await asyncio.gather(*(one(http, max_tokens) for _ in range(concurrency)))
            wall += time.perf_counter() - start
        batched_cpu = _cores(cpu, wall, await api_cpu_seconds(http))
        longs = [await one(http, 2, long_prompt(prompt_tokens, i + 1)) for i in range(repeats)]
    return {
        "single_tokens_per_s": sum(r.output_tokens for r in singles) / sum(r.e2e or 0 for r in singles),
        "single_decode_tokens_per_s": sum((r.output_tokens - 1) / ((r.e2e or 0) - (r.ttft or 0)) for r in singles)
        / len(singles),
        "ttft_s": sum(r.ttft or 0 for r in singles) / len(singles),
        "prompt_tokens": singles[0].prompt_tokens,
        "batched_tokens_per_s": sum(r.output_tokens for r in batch) / wall,
        "batched_ttft_p50_s": sorted(r.ttft or 0 for r in batch)[len(batch) // 2],
        "concurrency": concurrency,
        "single_cpu_cores": single_cpu,
        "batched_cpu_cores": batched_cpu,
        "long_prompt_ttft_s": sum(r.ttft or 0 for r in longs) / len(longs),
        "long_prompt_tokens": sum(r.prompt_tokens for r in longs) / len(longs),
    }


def measure(target: BenchTarget, args: argparse.Namespace) -> dict[str, Any]:
    """One variant's numbers, with memory sampled from its server while the streams run."""
    max_tokens, concurrency, repeats = sizes(args)
    with MemorySampler(target.url, target.model) as memory:
        result = asyncio.run(_streams(target, max_tokens, concurrency, repeats, prompt_tokens(args)))
    return {**result, "weight_bytes": memory.weight_bytes, "peak_rss_bytes": memory.peak_rss_bytes,
            "engine": target.engine, "precision": target.precision, "max_tokens": max_tokens}


def references(targets: list[BenchTarget], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """HF generate on each distinct 16-bit checkpoint, llama.cpp on the default GGUF (if the default model is
    among them) and on each served GGUF variant's own file, and vLLM offline for each vLLM variant started by
    the benchmark (same weights, no server)."""
    from steerserve.benchmarks.references import run_reference

    if args.no_references:
        return {}
    max_tokens, concurrency, repeats = sizes(args)
    common = {"prompt": PROMPT, "max_tokens": max_tokens, "concurrency": concurrency, "repeats": repeats}
    results = {}
    roots = list(dict.fromkeys(reference_checkpoint(t.root) for t in targets))
    for root in roots:
        name = "hf-generate" if len(roots) == 1 else f"hf-generate ({root})"
        results[name] = run_reference("hf-generate", root, **common)
    if any(_is_default(t) for t in targets):
        from steerserve.default_model import find_gguf

        results["llama.cpp (Q4_1 GGUF)"] = run_reference("llama.cpp", str(find_gguf()), **common)
    from steerserve.training.quantize.gguf import find_gguf as variant_gguf

    for target in targets:  # vLLM variants started here: the same engine and prompt offline, no server
        if target.engine == "vllm" and target.spec is not None:
            results[offline_name(target.model)] = run_reference("vllm-offline", target.spec,
                                                                server_args=args.server_arg, **common)
            results[async_name(target.model)] = run_reference("vllm-async", target.spec,
                                                              server_args=args.server_arg, **common)
    for target in targets:  # served GGUF variants: llama.cpp offline on the very same file
        if target.precision.startswith("gguf"):
            results[f"llama.cpp offline ({target.precision})"] = run_reference(
                "llama.cpp", str(variant_gguf(Path(target.root))), **common)
    return results


def offline_name(model: str) -> str:
    return f"vLLM offline ({model})"


def async_name(model: str) -> str:
    return f"vLLM async ({model})"


RATES = ("single_tokens_per_s", "batched_tokens_per_s")


def _shortfall(slower: dict[str, Any], faster: dict[str, Any]) -> dict[str, float]:
    """1 - slower/faster per rate both have (the share of time ``slower`` adds)."""
    if not slower or not faster or "skipped" in slower or "skipped" in faster:
        return {}
    return {key: 1 - slower[key] / faster[key] for key in RATES if slower.get(key) and faster.get(key)}


def overhead_split(results: dict[str, dict[str, Any]], refs: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """The server overhead in two parts, per variant and rate: vLLM's async path (AsyncLLM with requests
    arriving as tasks, against ``LLM.generate`` with the batch added at once) and our server (HTTP, steering,
    rendering, streaming; served against AsyncLLM)."""
    split = {}
    for label, served in results.items():
        model = label.rsplit(" (", 1)[0]
        offline, async_ = refs.get(offline_name(model), {}), refs.get(async_name(model), {})
        engine_part, server_part = _shortfall(async_, offline), _shortfall(served, async_)
        if engine_part and server_part:
            split[label] = {key: {"vllm_async_path": engine_part[key], "our_server": server_part[key]}
                            for key in RATES if key in engine_part and key in server_part}
    return split


def server_overhead(results: dict[str, dict[str, Any]], refs: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """Served vs offline vLLM on the same engine: the share of end-to-end time the server adds, per variant.

    Single stream: 1 - served tok/s / offline tok/s (the issue's "server + steering overhead"); batched the same
    for ``concurrency`` streams. Negative means the served run was faster (noise, or the server's batching).
    """
    overhead = {}
    for label, served in results.items():
        if shares := _shortfall(served, refs.get(offline_name(label.rsplit(" (", 1)[0]), {})):
            overhead[label] = shares
    return overhead


def reference_checkpoint(root: str) -> str:
    """The 16-bit checkpoint HF generate runs for a variant: itself, or the source a quantized one came from.

    Quantized variants are compared with the weights they were made from, so one reference serves every
    precision of a checkpoint (HF generate cannot load GGUF or compressed-tensors files the same way).
    """
    from steerserve.precision import Precision
    from steerserve.server.variants import read_manifest

    manifest = read_manifest(Path(root))
    source = (manifest.get("source") or {}).get("path")
    try:
        is_float = Precision(manifest.get("precision", "bf16")).is_float
    except ValueError:
        is_float = True
    return root if is_float or not source or not Path(source).is_dir() else source


def _is_default(target: BenchTarget) -> bool:
    from steerserve.default_model import DEFAULT_MODEL_NAME

    return target.model.startswith(DEFAULT_MODEL_NAME + ":")


def _row(name: str, r: dict[str, Any], base: float | None) -> list[Any]:
    if "skipped" in r:
        return [name, f"skipped: {r['skipped']}", "", "", "", "", "", "", ""]
    ratio = r["single_tokens_per_s"] / base if base else None
    batched = f"{r['batched_tokens_per_s']:.1f} (N={r['concurrency']})" if r.get("batched_tokens_per_s") else "—"
    long_ttft = (f"{r['long_prompt_ttft_s'] * 1000:.0f} ({r['long_prompt_tokens']:.0f} tok)"
                 if r.get("long_prompt_ttft_s") else "—")
    return [name, r["single_tokens_per_s"], r["single_decode_tokens_per_s"], r["ttft_s"] * 1000, long_ttft, batched,
            (r["weight_bytes"] or 0) / MiB, r["peak_rss_bytes"] / MiB, f"{ratio:.2f}x" if ratio else "—"]


def finish(results: dict[str, dict[str, Any]], refs: dict[str, dict[str, Any]],
           args: argparse.Namespace) -> tuple[dict[str, Any], str, Any]:
    """Table (ratios to the first HF reference) and a bar plot of single-stream and batched tokens/s."""
    base = next((r["single_tokens_per_s"] for r in refs.values() if "skipped" not in r), None)
    rows = [_row(name, r, base) for name, r in {**results, **refs}.items()]
    table = markdown_table(["runtime", "single tok/s", "decode tok/s", "TTFT ms", "long-prompt TTFT ms",
                            "batched tok/s", "weights MiB",
                            "peak RSS MiB", "single vs HF generate"], rows)
    max_tokens, concurrency, _ = sizes(args)
    overhead = server_overhead(results, refs)
    split = overhead_split(results, refs)

    def streams(key: str) -> str:
        return "single stream" if key.startswith("single") else f"{concurrency} streams"

    overhead_lines = "".join(
        f"- server overhead vs vLLM offline, {label}: "
        + ", ".join(f"{streams(key)} {share:+.1%}" for key, share in shares.items()) + "\n"
        for label, shares in overhead.items())
    overhead_lines += "".join(
        f"- of which, {label}: " + "; ".join(
            f"{streams(key)}: vLLM's async path {parts['vllm_async_path']:+.1%}, our server {parts['our_server']:+.1%}"
            for key, parts in by_rate.items()) + "\n"
        for label, by_rate in split.items())
    overhead_lines += "".join(
        f"- cores taken beside the engine, {label}: " + "; ".join(
            f"{streams(key)}: benchmark client {cores['client']:.2f}, server API process {cores['api_process']:.2f}"
            for key in ("single_cpu_cores", "batched_cpu_cores") if (cores := r.get(key))) + "\n"
        for label, r in results.items() if r.get("batched_cpu_cores") and r.get("engine") == "vllm")
    note = (f"{max_tokens} tokens per request (greedy, EOS ignored); long-prompt TTFT: a cold prompt of about "
            f"{prompt_tokens(args)} tokens (measured count in brackets), one at a time; peak RSS of the server's "
            f"process tree (references: of their own process).\n\n")
    fig, axes = figure(2, width=5.5)
    measured = {k: v for k, v in {**results, **refs}.items() if "skipped" not in v}
    for ax, key, title in ((axes[0][0], "single_tokens_per_s", "single stream tok/s"),
                           (axes[0][1], "batched_tokens_per_s", f"{concurrency} streams, total tok/s")):
        names = [k for k, v in measured.items() if v.get(key)]
        ax.barh(names, [measured[k][key] for k in names], color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
    return ({"variants": results, "references": refs, "server_overhead": overhead, "server_overhead_split": split},
            note + table + ("\n\n" + overhead_lines if overhead_lines else ""), fig)
