"""nf4 weights chosen by GPTQ error feedback instead of rounding each weight to its nearest code.

bitsandbytes' nf4 stores, for every block of 64 consecutive weights of a row, one float32 scale (the block's
absolute maximum) and a 4-bit index into a fixed 16-value codebook; ``quantize_4bit`` picks each weight's
*nearest* code. GPTQ (Frantar et al. 2022) keeps the same grid but rounds the columns of a layer one at a time
and moves the rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
inputs (``2 XᵀX`` over calibration tokens), so the *outputs* stay close rather than each weight. The result is
ordinary nf4 — same codebook, same per-block scales, same packed bytes layout — so transformers, the engine
and peft load it as any bitsandbytes checkpoint; only the chosen indices differ.

Why it matters here: the default model's weights were dequantized from a 4-bit GGUF, and nearest-code nf4
re-rounds them onto another 4-bit grid: perplexity ×1.24 over float on the MT-Bench reference answers, ×1.12
with GPTQ rounding (``benchmarks/results/nf4-gptq-rounding/``). Shrinking each block's scale to cut the weights'
squared error instead (clipping) made it worse (×1.31): the outliers matter. Rounding the columns with the
largest inputs first (act order) took the steered default's nf4 perplexity ratio from 1.152 to 1.095 and gave
back most of its verbosity slider (``benchmarks/results/nf4-act-order/``).

    hessians = input_hessians(float_model, names, token_batches)  # {linear name: [in, in]}
    indices, absmax = gptq_nf4(weight, hessians[name], codebook, act_order=True)
    write_nf4(linear4bit_module, indices, absmax)                # replaces the nearest-code bytes in place
    up, down = low_rank_correction(weight - dequantize(indices, absmax, codebook), hessians[name], rank=16)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

BLOCK_SIZE = 64
"""bitsandbytes' nf4 block size (what ``BitsAndBytesConfig`` uses by default; the scale covers 64 weights)."""
DAMPING = 0.01
"""Share of the Hessian's mean diagonal added to its diagonal (GPTQ's ``percdamp``): keeps it invertible."""
COLUMN_BATCH = 128
"""Columns rounded between two lazy updates of the rest of the matrix (GPTQ's block size; speed only)."""


@torch.no_grad()
def input_hessians(model: torch.nn.Module, names: Iterable[str],
                   batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean ``xᵀx`` of the named linear layers' inputs over the calibration tokens (float32, [in, in]).

    Taken in one pass of the unquantized model (not layer by layer on already-rounded outputs): simpler,
    and for a model this small the difference is within the noise of the calibration sample.
    """
    linears = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name: str) -> Any:
        def accumulate(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    try:
        for input_ids in batches:
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    if not any(counts.values()):
        raise ValueError("no calibration tokens reached the model")
    return {name: sums[name] / max(counts[name], 1) for name in sums}


@torch.no_grad()
def gptq_nf4(weight: torch.Tensor, hessian: torch.Tensor, codebook: torch.Tensor,
             damping: float = DAMPING, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook indices ([out, in], uint8) and per-block scales (float32) for one weight matrix.

    The scales are the blocks' absolute maxima of the *original* weights, as nearest rounding would store
    them, so no weight needs clipping before error feedback starts; later columns can be pushed past their
    scale by the updates and are clipped to the codebook's ±1 then. ``act_order`` (GPTQ's ``desc_act``) rounds
    the columns whose inputs are largest first, while most columns are still free to absorb their error; the
    scales stay fixed per block, so the stored layout is the same either way.
    """
    weight = weight.detach().float().clone()
    rows, columns = weight.shape
    if columns % BLOCK_SIZE:
        raise ValueError(f"input width {columns} is not a multiple of the nf4 block size {BLOCK_SIZE}")
    scales = weight.reshape(rows, columns // BLOCK_SIZE, BLOCK_SIZE).abs().amax(-1).clamp_min(1e-12)
    column_scales = scales.repeat_interleave(BLOCK_SIZE, dim=1)
    hessian = hessian.float().clone()
    dead = torch.diag(hessian) == 0  # inputs never seen in calibration: rounded plainly, nothing moves onto them
    hessian[dead, dead] = 1
    order = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(columns)
    weight, column_scales, hessian = weight[:, order], column_scales[:, order], hessian[order][:, order]
    hessian += damping * torch.diag(hessian).mean() * torch.eye(columns)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    midpoints = (codebook[1:] + codebook[:-1]) / 2  # a value's nearest code is the bucket it falls in
    ordered = torch.empty(rows, columns, dtype=torch.uint8)
    for start in range(0, columns, COLUMN_BATCH):
        stop = min(start + COLUMN_BATCH, columns)
        chunk = weight[:, start:stop].clone()
        errors = torch.zeros_like(chunk)
        local = inverse[start:stop, start:stop]
        for j in range(stop - start):
            scale = column_scales[:, start + j]
            index = torch.bucketize((chunk[:, j] / scale).clamp(-1, 1), midpoints)
            ordered[:, start + j] = index.to(torch.uint8)
            error = (chunk[:, j] - codebook[index] * scale) / local[j, j]
            chunk[:, j:] -= error.unsqueeze(1) * local[j, j:].unsqueeze(0)
            errors[:, j] = error
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]
    indices = torch.empty_like(ordered)
    indices[:, order] = ordered
    return indices, scales.reshape(-1)


@torch.no_grad()
def low_rank_correction(error: torch.Tensor, hessian: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``up`` [out, r] and ``down`` [r, in] whose product C minimises E‖(error − C)·x‖² over the calibration inputs
    x (``hessian`` = E[x xᵀ]): the truncated SVD of ``error`` in the eigenbasis of the inputs, mapped back.

    With H = V Λ Vᵀ and S = V Λ^½, E‖(E − C)x‖² = ‖(E − C) S‖²_F, so the best rank-r C is [E S]_r S⁻¹. Directions
    the calibration never excites (tiny eigenvalues) cost nothing and get nothing: the product [E S]_r S⁻¹ stays
    bounded there. ``rank`` above the layer's smaller side is that side (the exact error).
    """
    h = hessian.double()
    h = h + 1e-6 * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    eigenvalues, vectors = torch.linalg.eigh(h)
    eigenvalues = eigenvalues.clamp_min(1e-8 * eigenvalues.max())
    whiten, unwhiten = vectors * eigenvalues.sqrt(), (vectors * eigenvalues.rsqrt()).T
    left, singular, right = torch.linalg.svd(error.double() @ whiten, full_matrices=False)
    rank = min(rank, singular.numel())
    return (left[:, :rank] * singular[:rank]).float(), (right[:rank] @ unwhiten).float()


def read_nf4(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices ([out, in], uint8) and float32 scales a loaded ``bitsandbytes.nn.Linear4bit`` holds: the inverse
    of ``write_nf4``, for layers whose codes bitsandbytes chose itself (nearest rounding)."""
    state = module.weight.quant_state
    if state.nested or getattr(state, "packing_format_for_cpu", False):
        raise ValueError("nf4 with nested scales or repacked for a CPU kernel: not bitsandbytes' stored layout")
    packed = module.weight.data.reshape(-1)
    indices = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(tuple(state.shape))
    return indices, state.absmax.float()


def dequantize(indices: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The float weights these indices and scales stand for (what bitsandbytes computes with)."""
    rows, columns = indices.shape
    values = codebook[indices.long()].reshape(rows, columns // BLOCK_SIZE, BLOCK_SIZE)
    return (values * absmax.reshape(rows, -1, 1)).reshape(rows, columns)


def pack(indices: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' byte layout: the flattened indices two to a byte, the even one in the high nibble."""
    flat = indices.reshape(-1).to(torch.uint8)
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def write_nf4(module: Any, indices: torch.Tensor, absmax: torch.Tensor) -> None:
    """Put these indices and scales into a loaded ``bitsandbytes.nn.Linear4bit`` (no double quantization)."""
    weight, state = module.weight, module.weight.quant_state
    if state.nested:
        raise ValueError("nf4 with double quantization (nested scales) is not what steerserve quantizes")
    if tuple(state.shape) != tuple(indices.shape) or state.blocksize != BLOCK_SIZE:
        raise ValueError(f"layer of shape {tuple(state.shape)}, block {state.blocksize}: cannot hold "
                         f"indices of shape {tuple(indices.shape)} in blocks of {BLOCK_SIZE}")
    weight.data = pack(indices).to(weight.data.device)
    state.absmax = absmax.to(state.absmax.dtype)
