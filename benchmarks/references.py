"""Reference runtimes on the same weights, each in a fresh subprocess so its peak RSS is its own.

    result = run_reference("hf-generate", path, prompt="Hi", max_tokens=64, concurrency=8, repeats=3)
    python -m steerserve.benchmarks.references hf-generate CHECKPOINT --max-tokens 64   # prints a JSON line

``hf-generate``: transformers ``generate`` (greedy, in the dtype our transformers engine computes in here) on
the served checkpoint. ``llama.cpp``: llama-cpp-python on the default model's GGUF (the file the bf16
checkpoint was dequantized from), single stream only; skipped with a note when llama-cpp-python is not
installed. ``vllm-offline``: vLLM's ``LLM.generate`` built from a ``steerserve serve --model`` spec and flags,
with the engine arguments and the rendered prompt the server would use: the server's own overhead is the
served figure's distance from it. ``vllm-async``: the same engine through ``AsyncLLM``, requests streamed and
started together as the server's are, which splits that distance into vLLM's async path and our server.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


_RESULT_MARK = "steerserve-reference-result: "
"""Prefix of the one stdout line that carries the result; engines may print their own lines to stdout too."""


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timed(run: Callable[[int, int], float], max_tokens: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """The batch-generate references' figures from ``run(batch, tokens) -> seconds``: warm-up, ``repeats`` single
    streams, TTFT as a one-token generate (prefill), then ``repeats`` batches of ``concurrency`` sequences."""
    run(1, 4)  # warm-up
    singles = [run(1, max_tokens) for _ in range(repeats)]
    ttft = sum(run(1, 1) for _ in range(repeats)) / repeats
    return {"single_tokens_per_s": max_tokens * repeats / sum(singles),
            "single_decode_tokens_per_s": (max_tokens - 1) / (sum(singles) / repeats - ttft), "ttft_s": ttft,
            "batched_tokens_per_s": concurrency * max_tokens * repeats / sum(run(concurrency, max_tokens)
                                                                             for _ in range(repeats)),
            "concurrency": concurrency}


def hf_generate(path: str, prompt: str, max_tokens: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """Single-stream and batched tokens/s of ``generate``; TTFT = one-token generate (prefill)."""
    import torch
    from transformers import AutoTokenizer

    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_model

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    # As the transformers engine loads a 16-bit checkpoint: bf16, or float32 on a CPU that emulates bf16.
    model = load_model(path, EngineConfig(model=path, precision=Precision.BF16))
    messages = [{"role": "user", "content": prompt}]
    text = (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if tokenizer.chat_template else prompt)

    def run(batch: int, tokens: int) -> float:
        inputs = tokenizer([text] * batch, return_tensors="pt", add_special_tokens=False)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return time.perf_counter() - start

    return {**_timed(run, max_tokens, concurrency, repeats),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "peak_rss_bytes": _peak_rss_bytes(), "source": path}


def llama_cpp(gguf: str, prompt: str, max_tokens: int, repeats: int) -> dict[str, Any]:
    """Greedy decoding of exactly ``max_tokens`` tokens (EOS ignored, like the servers' ``ignore_eos``)."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    tokens = llm.tokenize(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True)

    def run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        first = None
        for count, _ in enumerate(llm.generate(tokens, temp=0.0, reset=True), start=1):
            first = first or time.perf_counter()
            if count == max_tokens:
                break
        end = time.perf_counter()
        return end - start, (first or end) - start

    run()  # warm-up
    timings = [run() for _ in range(repeats)]
    seconds, ttft = sum(t for t, _ in timings) / repeats, sum(f for _, f in timings) / repeats
    return {"single_tokens_per_s": max_tokens / seconds, "single_decode_tokens_per_s": (max_tokens - 1) / (seconds - ttft),
            "ttft_s": ttft, "batched_tokens_per_s": None, "concurrency": None,
            "weight_bytes": Path(gguf).stat().st_size, "peak_rss_bytes": _peak_rss_bytes(), "source": gguf}


def _tree_rss_bytes() -> int:
    """RSS of this process and its children (vLLM's engine core runs in a child process)."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


def _vllm_setup(spec: str, server_args: list[str], prompt: str) -> tuple[dict[str, Any], list[int]]:
    """The engine arguments and rendered prompt token ids ``steerserve serve --model spec`` would use."""
    from steerserve.cli import serve_settings
    from steerserve.server.app import build_registry
    from steerserve.server.engines.vllm_args import configure_cpu_threads
    from steerserve.server.variants import prepare_variant

    variant = next(iter(build_registry(serve_settings(["--model", spec, *server_args])).variants.values()))
    if variant.engine_name != "vllm":
        raise ValueError(f"{spec}: served by {variant.engine_name}, not vLLM")
    prepare_variant(variant)
    configure_cpu_threads()
    return variant.engine.engine_kwargs(), variant.tokenize(variant.render([{"role": "user", "content": prompt}], None))


def _vllm_result(timed: dict[str, Any], ids: list[int], spec: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from steerserve.server.engines.weights import checkpoint_weight_bytes

    return {**timed, "prompt_tokens": len(ids), "peak_rss_bytes": _tree_rss_bytes(), "source": spec,
            "weight_bytes": checkpoint_weight_bytes(Path(kwargs["model"]), kwargs["dtype"],
                                                    fp8=kwargs.get("quantization") == "fp8")}


def vllm_offline(spec: str, server_args: list[str], prompt: str, max_tokens: int, concurrency: int,
                 repeats: int) -> dict[str, Any]:
    """Single-stream and batched tokens/s of ``LLM.generate`` on the engine ``steerserve serve --model spec``
    would build (same engine arguments, same rendered prompt token ids, greedy, EOS ignored). All of a batch's
    requests enter the engine before its first step."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs, ids = _vllm_setup(spec, server_args, prompt)
    llm = LLM(**kwargs)

    def run(batch: int, tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids)] * batch, params, use_tqdm=False)
        return time.perf_counter() - start

    return _vllm_result(_timed(run, max_tokens, concurrency, repeats), ids, spec, kwargs)


def vllm_async(spec: str, server_args: list[str], prompt: str, max_tokens: int, concurrency: int,
               repeats: int) -> dict[str, Any]:
    """As :func:`vllm_offline`, through vLLM's ``AsyncLLM`` the way the server drives it: each request its own
    streamed ``generate`` (one delta per token), a batch's requests started together as asyncio tasks, so they
    reach the engine over its first steps as HTTP requests do. Served vs this isolates our server's cost;
    this vs ``LLM.generate`` isolates what arriving one by one costs inside vLLM."""
    import asyncio
    import uuid

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs, ids = _vllm_setup(spec, server_args, prompt)
    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(asyncio.to_thread(AsyncLLM.from_engine_args, AsyncEngineArgs(**kwargs)))

    async def one(tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        async for _ in engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params, uuid.uuid4().hex):
            pass

    async def batch_of(batch: int, tokens: int) -> None:
        await asyncio.gather(*(one(tokens) for _ in range(batch)))

    def run(batch: int, tokens: int) -> float:
        start = time.perf_counter()
        loop.run_until_complete(batch_of(batch, tokens))
        return time.perf_counter() - start

    try:
        return _vllm_result(_timed(run, max_tokens, concurrency, repeats), ids, spec, kwargs)
    finally:
        engine.shutdown()


def available(kind: str) -> str | None:
    """None when ``kind`` can run here, else why not."""
    if kind == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return None


def run_reference(kind: str, source: str, *, prompt: str, max_tokens: int, concurrency: int, repeats: int,
                  server_args: list[str] | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run one reference in a child process and return its JSON (or ``{"skipped": why}``)."""
    why = available(kind)
    if why:
        return {"skipped": why}
    command = [sys.executable, "-m", "steerserve.benchmarks.references", kind, source, "--prompt", prompt,
               "--max-tokens", str(max_tokens), "--concurrency", str(concurrency), "--repeats", str(repeats),
               *(f"--server-arg={arg}" for arg in server_args or [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"skipped": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if not lines:
        return {"skipped": f"failed: no result line in its output (exit {done.returncode})"}
    return json.loads(lines[-1][len(_RESULT_MARK):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["hf-generate", "llama.cpp", "vllm-offline", "vllm-async"])
    parser.add_argument("source", help="checkpoint folder (hf-generate), GGUF file (llama.cpp) or a "
                                       "'steerserve serve --model' spec (vllm-offline)")
    parser.add_argument("--server-arg", action="append", default=[], help="vllm-offline: a 'steerserve serve' flag")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.kind == "hf-generate":
        result = hf_generate(args.source, args.prompt, args.max_tokens, args.concurrency, args.repeats)
    elif args.kind in ("vllm-offline", "vllm-async"):
        run = vllm_offline if args.kind == "vllm-offline" else vllm_async
        result = run(args.source, args.server_arg, args.prompt, args.max_tokens, args.concurrency, args.repeats)
    else:
        result = llama_cpp(args.source, args.prompt, args.max_tokens, args.repeats)
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
