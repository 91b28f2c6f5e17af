"""Probe (session 34): nf4 plus a low-rank correction of its rounding error, chosen in the eigenspace of each
layer's inputs, so that the correction cancels the error where the calibration inputs are large.

For each linear layer, R = W - Q (float weights minus the nf4 weights, dequantized) and H = E[x xᵀ] of its inputs
on the oasst1 calibration set (what GPTQ rounding uses); with H = V Λ Vᵀ, the rank-r correction is the truncated
SVD of R V Λ^½ mapped back by Λ^-½ Vᵀ: the rank-r matrix C minimising E‖(R - C) x‖².

usage: python nf4_error_correction.py SOURCE NF4_TWIN OUT RANK [RANK...]
SOURCE: the float checkpoint the nf4 was made from; NF4_TWIN: the nf4 checkpoint's float32 twin
(``steerserve quantize NF4 --precision fp32``). Writes OUT-r{RANK}: the twin's weights plus the correction, in
float32 (a twin again: what vLLM serves), and prints its perplexity ratio.
"""
import json, shutil, sys, time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steerserve.precision import Precision
from steerserve.training.quantize.calibration import calibration_texts
from steerserve.training.quantize.nf4_rounding import input_hessians, low_rank_correction
from steerserve.training.quantize.quality import QualityConfig, build_eval_set, measure

source, twin, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
BF16_PERPLEXITY = 8.147327032200563  # the merged source's, as quantize measured it
ranks = [int(r) for r in sys.argv[4:]]
torch.set_grad_enabled(False)
tok = AutoTokenizer.from_pretrained(source)
W = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
names = [n for n, m in W.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
texts = calibration_texts("oasst1", 128, source)
batches = [tok(t, return_tensors="pt", truncation=True, max_length=512).input_ids for t in texts]
t0 = time.time()
H = input_hessians(W, names, batches)
print("hessians", round(time.time() - t0), "s", flush=True)
Q = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
factors = {}
for n in names:  # the fit `steerserve quantize --low-rank-correction` ships; a lower rank's factors are a prefix
    R = (W.get_submodule(n).weight.double() - Q.get_submodule(n).weight.double())
    up, down = low_rank_correction(R, H[n], max(ranks))
    factors[n] = (up, down, (R @ H[n].double() * R).sum().sqrt().item())  # E|Rx|^2 = tr(R H R^T)
print("svd done", round(time.time() - t0), "s", flush=True)
eval_set = build_eval_set(source, QualityConfig(text_chars=8000, mcq_per_subject=1))
for r in ranks:
    dst = Path(f"{out}-r{r}")
    shutil.copytree(twin, dst, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    kept = []
    for n, (up, down, total) in factors.items():
        model.get_submodule(n).weight.add_(up[:, :r] @ down[:r])
        kept.append((up[:, :r].norm(dim=0) ** 2).sum().item() / total ** 2)
    model.save_pretrained(dst)
    m = json.loads((twin / "manifest.json").read_text())
    m["name"] = f"{m['name']}-eora{r}"
    m["notes"] = [f"probe: {twin} plus a rank-{r} correction of its nf4 error in the input eigenspace"]
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    q = measure(dst, Precision.FP32, "transformers", eval_set)
    print(f"rank {r}: weighted error kept {sum(kept) / len(kept):.3f} mean; perplexity {q['perplexity']:.4f} "
          f"ratio {q['perplexity'] / BF16_PERPLEXITY:.4f}", flush=True)
q = measure(twin, Precision.FP32, "transformers", eval_set)
print(f"twin alone: perplexity {q['perplexity']:.4f} ratio {q['perplexity'] / BF16_PERPLEXITY:.4f}")
