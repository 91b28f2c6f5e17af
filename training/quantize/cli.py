"""``steerserve quantize <checkpoint-dir | default> --precision P --output DIR``.

    steerserve quantize default --precision gptq-w4 --output runs/smollm2-gptq-w4 --calibration oasst1

Writes DIR atomically (never over a finished output without ``--force``) with the
variant's weights, the source's tokenizer, and ``manifest.json``: source, precision,
method and library versions, calibration data, ``bytes`` on disk, the hardware it ran on,
and quality measured against the 16-bit source. A precision this machine cannot produce is
refused in one line (exit 3).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from steerserve.default_model import CACHE_DIR
from steerserve.precision import Precision
from steerserve.training.quantize.methods import Rounding, Scales

logger = logging.getLogger(__name__)

EXIT_UNAVAILABLE = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint directory written by a training recipe, a LoRA adapter "
                        "directory (merged into its base first), or 'default'")
    parser.add_argument("--precision", required=True, type=Precision, choices=list(Precision),
                        metavar="{" + ",".join(p.value for p in Precision) + "}")
    parser.add_argument("--output", type=Path, required=True, help="output directory (written atomically)")
    parser.add_argument("--force", action="store_true", help="overwrite a finished output")
    parser.add_argument("--calibration", default="oasst1",
                        help="calibration data set: oasst1 (plain text), oasst1-chat (oasst1 exchanges rendered as "
                             "the checkpoint is served: chat template, steering, sliders spread) or mmlu-dev")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--calibration-max-tokens", type=int, default=512, help="tokens kept per calibration text")
    parser.add_argument("--rounding", choices=[rounding.value for rounding in Rounding],
                        help="nf4 only: how each weight's 4-bit code is chosen: gptq-act-order (default; error "
                             "feedback on the calibration set, columns with the largest inputs first; same nf4 "
                             "format), gptq (the same in column order) or nearest (bitsandbytes' own rounding)")
    parser.add_argument("--low-rank-correction", type=int, default=0, metavar="RANK",
                        help="nf4 only: keep a rank-RANK correction of each layer's rounding error, fitted on the "
                             "calibration inputs, in 16 bits beside the 4-bit weights (16: ~10 MB on the default "
                             "model); the transformers engine adds it unmerged, a float twin merges it")
    parser.add_argument("--group-size", type=int, metavar="COLUMNS",
                        help="gptq-w4, gptq-w8, w4a16 only: input columns sharing one scale; smaller rounds closer "
                             "for a few more bytes (default: the largest of 128, 64, 32 dividing every layer's width)")
    parser.add_argument("--scales", choices=[scales.value for scales in Scales],
                        help="w4a16 only: how each group's scale is set: mse (default; the clipping of the group's "
                             "range that rounds it with the least squared error) or minmax (its largest weight)")
    parser.add_argument("--eval-chars", type=int, default=16000, help="held-out characters scored for perplexity")
    parser.add_argument("--mcq-per-subject", type=int, default=2, help="MMLU test questions per subject (57)")
    parser.add_argument("--mcq-items", type=int, help="keep only the first N MCQ items (quick checks)")
    parser.add_argument("--scorer", choices=["transformers", "vllm", "llama.cpp"],
                        help="override how quality is measured")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                        help="where 'default' is converted, tool environments live and source quality is remembered")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def resolve_source(text: str, cache_dir: Path, precision: Precision | None = None) -> Path:
    """A float checkpoint directory: ``default`` is converted once into the cache, and a LoRA adapter
    (the shipped ``models/steered-default/acsft``, or any adapter directory) is merged once into its base.

    A bitsandbytes checkpoint (int8, nf4) is a source only for a float ``precision``: its float twin, the very
    weights it holds dequantized, which a float engine serves several times faster (benchmarks sweep the twin).
    Any other quantized checkpoint is refused: quantizing it again would compound two roundings.
    """
    from steerserve.precision import BITSANDBYTES_PRECISIONS
    from steerserve.server.variants import read_manifest

    if text == "default":
        from steerserve.default_model import default_model_dir

        return default_model_dir(cache_dir)
    path = Path(text).expanduser().resolve()
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            return _merged_adapter(path, cache_dir)
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json) nor a LoRA adapter")
    held = Precision(read_manifest(path).get("precision", "bf16"))
    if held.is_float or (held in BITSANDBYTES_PRECISIONS and precision is not None and precision.is_float):
        return path
    raise ValueError(f"{path} is already quantized ({held.value}); quantize from its 16-bit source"
                     + (" (or dequantize it: --precision fp32)" if held in BITSANDBYTES_PRECISIONS else ""))


def _merged_adapter(adapter_dir: Path, cache_dir: Path) -> Path:
    """The adapter merged into the base its manifest names (the default model or a checkpoint path).

    The merge lands where the server would put it (``cache_dir/merged``), with the adapter's
    manifest beside it, so the variants keep the adapter's name and steering method.
    """
    from steerserve.default_model import DEFAULT_MODEL_NAME, default_model_dir
    from steerserve.server.adapters import find_adapter, merge_adapter, merged_cache_dir
    from steerserve.server.variants import read_manifest
    from steerserve.training.output import write_json_atomic

    source = find_adapter(adapter_dir)
    base_name = source.manifest.get("base_model") or source.config.get("base_model_name_or_path") or ""
    if base_name == DEFAULT_MODEL_NAME:
        base = default_model_dir(cache_dir)
    elif (Path(base_name).expanduser() / "config.json").is_file():
        base = Path(base_name).expanduser().resolve()
    else:
        raise FileNotFoundError(f"{adapter_dir}: its base {base_name!r} is neither the default model nor a "
                                "checkpoint directory here; merge it first or pass the merged checkpoint")
    merged = merge_adapter(base, source.adapter_dir, merged_cache_dir(cache_dir, source.adapter_dir, base))
    manifest = {**source.manifest, "name": source.manifest.get("name") or source.default_name,
                "precision": read_manifest(base).get("precision", "bf16"), "merged_from": str(source.adapter_dir),
                "base_model": source.manifest.get("base_model") or str(base)}
    write_json_atomic(merged / "manifest.json", manifest)
    return merged


def _source_info(source: Path) -> dict[str, Any]:
    """Name, precision and steering the variant inherits, so it is served as ``name:precision``."""
    from steerserve.server.variants import read_manifest
    from steerserve.training.quantize.calibration import served_steering

    manifest = read_manifest(source)
    steering = served_steering(source).value
    return {"path": str(source), "name": manifest.get("name") or source.name,
            "precision": manifest.get("precision", "bf16"), "steering": steering,
            "recipe": manifest.get("recipe"), "base_model": manifest.get("base_model"),
            **({"merged_from": manifest["merged_from"]} if manifest.get("merged_from") else {})}


# Options (argparse dests) that shape how nf4's 4-bit codes are chosen or corrected; any other precision refuses
# them by their flag.
NF4_ONLY_OPTIONS = ("rounding", "low_rank_correction")
GROUPED_PRECISIONS = (Precision.GPTQ_W4, Precision.GPTQ_W8, Precision.W4A16)


def run(args: argparse.Namespace) -> Path:
    """Quantize, measure, and commit the output directory; returns it."""
    from steerserve.training.manifest import git_commit, hardware
    from steerserve.training.output import RunDir
    from steerserve.training.quantize.methods import (
        QuantizeJob, check_available, dir_bytes, load_quantizer, versions,
    )
    from steerserve.training.quantize.quality import QualityConfig, build_eval_set, measure_source, summarise, SCORERS

    for dest in NF4_ONLY_OPTIONS:
        if getattr(args, dest) and args.precision is not Precision.NF4:
            raise ValueError(f"--{dest.replace('_', '-')} applies to nf4 only, not {args.precision.value}")
    if args.low_rank_correction < 0:
        raise ValueError(f"--low-rank-correction must be a rank of 1 or more (0: none), not {args.low_rank_correction}")
    if args.scales and args.precision is not Precision.W4A16:
        raise ValueError(f"--scales applies to w4a16 only, not {args.precision.value}")
    if args.group_size is not None and args.precision not in GROUPED_PRECISIONS:
        raise ValueError(f"--group-size applies to {', '.join(p.value for p in GROUPED_PRECISIONS)}, "
                         f"not {args.precision.value}")
    source = resolve_source(args.source, args.cache_dir, args.precision)
    info = _source_info(source)
    if args.group_size is not None:
        from steerserve.training.quantize.gptq import group_size_for

        group_size_for(source, args.group_size)  # refuse a width it does not divide before any work
    check_available(args.precision)
    if args.scorer == "vllm":
        from steerserve.server.engines.vllm_args import detect_platform, precision_unavailable

        if reason := precision_unavailable(args.precision, detect_platform()):
            raise ValueError(f"--scorer vllm cannot score {args.precision.value} here: {reason}")
    quantizer = load_quantizer(args.precision)
    asked = {"group_size": args.group_size} if args.group_size is not None else {}  # kept in the fingerprint
    if args.scales:
        asked["scales"] = args.scales
    run_dir = RunDir(args.output, {"recipe": "quantize", "source": str(source), "precision": args.precision.value,
                                   **asked},
                     force=args.force)
    if run_dir.work.exists():  # a crashed quantization is cheaper to redo than to trust
        shutil.rmtree(run_dir.work)
    work = run_dir.prepare()
    quality_config = QualityConfig(text_chars=args.eval_chars, mcq_per_subject=args.mcq_per_subject,
                                   mcq_max_items=args.mcq_items)
    eval_set = build_eval_set(source, quality_config)
    source_quality = measure_source(source, Precision(info["precision"]), eval_set, args.cache_dir)
    logger.info("source quality: %s", source_quality)
    rounding = {"rounding": Rounding(args.rounding)} if args.rounding else {}  # else QuantizeJob's default
    scales = {"scales": Scales(args.scales)} if args.scales else {}
    job = QuantizeJob(source, args.precision, args.calibration, args.calibration_samples,
                      args.calibration_max_tokens, eval_set=None if args.scorer else eval_set,
                      low_rank_correction=args.low_rank_correction, group_size=args.group_size, **rounding,
                      **scales)
    started = time.monotonic()
    try:
        result = quantizer(job, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    scorer = args.scorer or result.scorer
    if result.raw_quality is not None and not args.scorer:
        quality = summarise(result.raw_quality, eval_set)
    else:
        quality = summarise(SCORERS[scorer](work, args.precision, eval_set), eval_set)
    logger.info("%s quality: %s", args.precision.value, quality)
    manifest = {
        "name": info["name"], "precision": args.precision.value, "steering": info["steering"], "servable": True,
        "recipe": "quantize", "base_model": info["base_model"] or info["path"], "source": info,
        "method": result.method, "libraries": result.libraries, "settings": result.settings,
        "calibration": result.calibration, "bytes": dir_bytes(work),
        "quality": {"variant": quality, "source": source_quality, "scored_with": scorer,
                    **_deltas(quality, source_quality), "data": eval_set["description"]},
        "quantize_seconds": round(seconds, 1), "notes": result.notes, "git_commit": git_commit(),
        "hardware": hardware(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions("steerserve", "torch", "transformers", *result.libraries),
    }
    return run_dir.commit(manifest)


def _deltas(variant: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    deltas = {"perplexity_ratio": variant["perplexity"] / source["perplexity"]}
    if "mcq_accuracy" in variant and "mcq_accuracy" in source:
        deltas["mcq_accuracy_delta"] = variant["mcq_accuracy"] - source["mcq_accuracy"]
    return deltas


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``steerserve quantize``; one line on stderr and a non-zero code on refusal."""
    from steerserve.training.output import OutputExists
    from steerserve.training.quantize.methods import Unavailable

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        output = run(args)
    except Unavailable as exc:
        print(f"steerserve quantize: {args.precision.value} cannot be produced here: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (OutputExists, FileNotFoundError, ValueError) as exc:
        print(f"steerserve quantize: {exc}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
