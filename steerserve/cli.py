"""The ``steerserve`` command: one dispatch dict of subcommands.

    steerserve serve                                   # the default model, vLLM engine, 127.0.0.1:8000
    steerserve serve --model ./ckpt,name=steer --engine transformers --port 9000
    steerserve serve --model ./ckpt,name=steer --model ./runs/sft-lora,base=steer:bf16   # a LoRA adapter on it
    steerserve train dpo --config training/recipes/dpo-tiny.yaml --output runs/dpo

Heavy imports happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steerserve.server.settings import ServerSettings


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve serve", description="Serve steerable models over an OpenAI-compatible API.")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="PATH[,key=value...]",
        help="a checkpoint directory (or 'default'), with optional name=, precision=, engine=, steering=, "
        "max_model_len=; or a LoRA adapter directory with base=MODEL_ID (and merged=true to serve it merged); "
        "repeat to serve several variants. Default: the default model.",
    )
    parser.add_argument("--config", type=Path, help="YAML file with server settings and a models: list")
    parser.add_argument("--engine", help="default engine: vllm (default) or transformers")
    parser.add_argument("--no-shipped-adapters", action="store_true",
                        help="without --model: serve the default model alone, not its shipped LoRA adapters "
                             "(models/steered-default: steered, dpo-robust, dpo-sigmoid, mcq)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key", help="require this bearer key (or set STEERSERVE_API_KEY)")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int, help="most sequences decoded together")
    parser.add_argument("--kv-cache-gib", type=float, help="vLLM KV-cache size in GiB")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM: by default torch.compile the model first (~2 min once per model, then "
                             "cached; faster decoding, see benchmarks/NOTES.md); --enforce-eager runs eagerly "
                             "(starts in ~25 s on CPU)")
    parser.add_argument("--tensor-parallel-size", type=int, help="vLLM: GPUs each layer is split across (CUDA only)")
    parser.add_argument("--pipeline-parallel-size", type=int, help="vLLM: GPUs the layers are staged across (CUDA only)")
    parser.add_argument("--default-max-tokens", type=int)
    parser.add_argument("--reading-level-guidance", type=float, metavar="LOGITS",
                        help="how hard the complexity slider pushes at level 0, in logits per syllable (default "
                             "2; 0: the prompt alone steers complexity); per variant: --model PATH,"
                             "reading_level_guidance=X")
    parser.add_argument("--verbosity-guidance", type=float, metavar="LOGITS",
                        help="how hard the verbosity slider pushes the end-of-turn token up at level 0, in logits "
                             "(default 6; 0: the prompt alone steers length); per variant: --model PATH,"
                             "verbosity_guidance=X")
    parser.add_argument("--loop-guard", type=int, metavar="COPIES",
                        help="end an answer once its tail repeats the same stretch of tokens this many times in a "
                             "row (default 4; 0: loops run to max_tokens); per variant: --model PATH,loop_guard=N")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    return parser


def serve_settings(argv: list[str]) -> ServerSettings:
    """``steerserve serve`` flags over env/YAML settings, as the server will run them.

    The benchmarks' offline vLLM reference builds its engine from the same flags, so both start alike.
    """
    from steerserve.server.settings import ServerSettings, VariantSpec

    args = _serve_parser().parse_args(argv)
    overrides = {
        key: getattr(args, key)
        for key in ("engine", "host", "port", "api_key", "max_model_len", "max_num_seqs", "kv_cache_gib",
                    "enforce_eager", "tensor_parallel_size", "pipeline_parallel_size", "default_max_tokens",
                    "log_level", "reading_level_guidance", "verbosity_guidance", "loop_guard")
        if getattr(args, key) is not None
    }
    if args.model:
        overrides["models"] = [VariantSpec.parse(text) for text in args.model]
    settings = ServerSettings.from_yaml(args.config, **overrides) if args.config else ServerSettings(**overrides)
    if not settings.models:  # the default model, plus the steered adapters shipped for it (make steered-default)
        from steerserve.steered_default import default_model_specs

        shipped = not args.no_shipped_adapters
        specs = default_model_specs(cache_dir=settings.cache_dir) if shipped else [VariantSpec(path="default")]
        settings = settings.model_copy(update={"models": specs})
    return settings


def serve(argv: list[str]) -> int:
    """Parse flags over env/YAML settings and run uvicorn until interrupted."""
    settings = serve_settings(argv)
    import uvicorn

    from steerserve.server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # SIGTERM: uvicorn stops accepting and waits up to the grace period for in-flight requests;
    # the app's lifespan then aborts whatever still runs and shuts the engines down. uvicorn
    # re-raises the signal once done; this handler receives it, so a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


def train(argv: list[str]) -> int:
    from steerserve.training.cli import main as train_main

    return train_main(argv)


def _client_command(module: str) -> Callable[[list[str]], int]:
    """A subcommand whose ``main(argv)`` lives in ``module``, imported only when it runs."""

    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(argv)

    return run


def quantize(argv: list[str]) -> int:
    from steerserve.training.quantize.cli import main as quantize_main

    return quantize_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": serve,
    "train": train,
    "quantize": quantize,
    "chat": _client_command("steerserve.clients.chat_cli"),
    "mcq": _client_command("steerserve.clients.mcq_cli"),
    "load": _client_command("steerserve.clients.loadgen.cli"),
    "bench": _client_command("steerserve.benchmarks.cli"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"usage: steerserve {{{known}}} [options]\n\nsubcommands: {known}; 'steerserve CMD --help' for each.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (FileNotFoundError, ValueError) as exc:
        print(f"steerserve {argv[0]}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
