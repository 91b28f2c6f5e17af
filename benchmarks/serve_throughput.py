"""Decode throughput over HTTP per engine, beside HF ``generate`` on the same weights, in one run.

    python -m steerserve.benchmarks.serve_throughput --engine vllm --engine transformers --output results/throughput

Each engine runs in its own ``steerserve serve`` process on a free loopback port;
the reference (transformers ``generate``, greedy, same checkpoint, same prompt)
runs in this process after the servers are gone, so they never share the cores.
Reports single-stream tokens/s (and decode-only tokens/s after the first token)
and total tokens/s at N concurrent streams, as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

PROMPT = "Explain how a refrigerator keeps food cold, step by step."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(engine: str, model: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "steerserve.cli", "serve", "--model", model, "--engine", engine,
               "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(command, env=dict(os.environ))


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become healthy")


async def one_stream(http: httpx.AsyncClient, model: str, max_tokens: int) -> dict[str, float]:
    """One streamed chat request: tokens, wall time, time to first token."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"tokens": tokens, "seconds": end - start, "ttft": (first or end) - start}


async def measure_server(url: str, model: str, max_tokens: int, concurrency: int, repeats: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one_stream(http, model, 8)  # warm-up
        singles = [await one_stream(http, model, max_tokens) for _ in range(repeats)]
        start = time.perf_counter()
        batch = await asyncio.gather(*(one_stream(http, model, max_tokens) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in singles)
    seconds = sum(s["seconds"] for s in singles)
    decode = sum((s["tokens"] - 1) / (s["seconds"] - s["ttft"]) for s in singles) / len(singles)
    return {
        "single_tokens_per_s": tokens / seconds,
        "single_decode_tokens_per_s": decode,
        "single_ttft_s": sum(s["ttft"] for s in singles) / len(singles),
        "concurrent_total_tokens_per_s": sum(b["tokens"] for b in batch) / wall,
        "concurrency": concurrency,
    }


def measure_hf_generate(path: str, max_tokens: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """The reference: transformers ``generate``, greedy, bf16, same chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)

    def run(batch: int) -> float:
        inputs = tokenizer([text] * batch, return_tensors="pt", add_special_tokens=False)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        assert out.shape[1] - inputs["input_ids"].shape[1] == max_tokens
        return batch * max_tokens / (time.perf_counter() - start)

    run(1)  # warm-up
    single = sum(run(1) for _ in range(repeats)) / repeats
    return {"single_tokens_per_s": single, "concurrent_total_tokens_per_s": run(concurrency), "concurrency": concurrency}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    reference = results["hf-generate"]["single_tokens_per_s"]
    rows = ["| runtime | single-stream tok/s | decode tok/s | TTFT s | N concurrent total tok/s | single vs HF generate |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['single_tokens_per_s']:.1f} | {r.get('single_decode_tokens_per_s', float('nan')):.1f} | "
            f"{r.get('single_ttft_s', float('nan')):.3f} | {r['concurrent_total_tokens_per_s']:.1f} (N={r['concurrency']}) | "
            f"{r['single_tokens_per_s'] / reference:.2f}x |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", action="append", default=None, help="vllm and/or transformers (repeat)")
    parser.add_argument("--model", default="default", help="checkpoint dir or 'default'")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("results/throughput"))
    args = parser.parse_args(argv)
    from steerserve.default_model import DEFAULT_MODEL_NAME, default_model_dir
    from steerserve.server.settings import ServerSettings

    path = str(default_model_dir(ServerSettings().cache_dir)) if args.model == "default" else args.model
    model_id = f"{DEFAULT_MODEL_NAME if args.model == 'default' else Path(path).name}:bf16"
    results: dict[str, dict[str, Any]] = {}
    for engine in args.engine or ["vllm", "transformers"]:
        port = _free_port()
        process = start_server(engine, args.model, port)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process)
            results[f"steerserve/{engine}"] = asyncio.run(
                measure_server(f"http://127.0.0.1:{port}", model_id, args.max_tokens, args.concurrency, args.repeats)
            )
        finally:
            process.terminate()
            process.wait(timeout=60)
    results["hf-generate"] = measure_hf_generate(path, args.max_tokens, args.concurrency, args.repeats)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "throughput.json").write_text(json.dumps(results, indent=2))
    (args.output / "throughput.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
