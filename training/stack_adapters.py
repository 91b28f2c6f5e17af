"""One LoRA adapter that equals several applied in turn: a run trained on top of another run's merged model.

A DPO run on top of the AC-SFT run learns a LoRA delta for the *merged* AC-SFT model, so serving it on the
default model takes both deltas. vLLM applies one LoRA per request, and the repo ships adapters, not merged
checkpoints (hundreds of MB). Two low-rank deltas add up to one of rank ``r1 + r2``, exactly:

    s1 * B1 @ A1 + s2 * B2 @ A2 == [s1 * B1 | s2 * B2] @ [A1 ; A2]        (s = lora_alpha / r)

so the stacked adapter has rank ``r1 + r2`` and ``lora_alpha = r1 + r2`` (scaling 1), the union of both
adapters' target modules and layers, and zero factors where only one adapter touches a module (a chain of
three or more stacks the same way). Only plain LoRA (no DoRA, rsLoRA, per-module rank or alpha patterns,
biases or extra saved modules) is accepted; anything else is a ValueError, not a silently wrong adapter::

    python -m steerserve.training.stack_adapters RUNS/acsft/adapter RUNS/dpo-sliders/adapter OUT
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from steerserve.staging import staged_directory

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_FACTORS = (".lora_A.weight", ".lora_B.weight")


def _plain_lora_config(adapter: Path) -> dict:
    """The adapter's PEFT config, refused (ValueError naming the setting) unless it is plain LoRA."""
    config = json.loads((adapter / CONFIG_FILE).read_text())
    refusals = {
        "peft_type": config.get("peft_type") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    refused = [name for name, bad in refusals.items() if bad]
    if refused:
        raise ValueError(f"{adapter}: cannot stack a LoRA adapter with {', '.join(refused)} set; "
                         "only plain LoRA adapters stack exactly")
    return config


def _factors(adapter: Path) -> dict[str, tuple]:
    """Module prefix -> (lora_A, lora_B) tensors, in float32."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / WEIGHTS_FILE))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_FACTORS if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{adapter / WEIGHTS_FILE}: {key!r} is not a LoRA factor; cannot stack it")
        modules.setdefault(key[: -len(suffix)], {})[suffix] = tensor.float()
    incomplete = [prefix for prefix, pair in modules.items() if len(pair) != 2]
    if incomplete:
        raise ValueError(f"{adapter / WEIGHTS_FILE}: {incomplete[0]} has only one of lora_A / lora_B")
    return {prefix: (pair[LORA_FACTORS[0]], pair[LORA_FACTORS[1]]) for prefix, pair in modules.items()}


def _union(target_lists: list[list | None]) -> list | None:
    """Union of target lists, where None means "everything" (PEFT's meaning for layers_to_transform)."""
    if any(targets is None for targets in target_lists):
        return None
    return sorted({target for targets in target_lists for target in targets})


def stacked_factors(adapters: Sequence[Path]) -> tuple[dict, dict]:
    """The stacked config and ``{tensor name: tensor}`` for ``adapters`` applied in order (see module doc)."""
    import torch

    if len(adapters) < 2:
        raise ValueError("stacking takes two or more adapters")
    configs = [_plain_lora_config(adapter) for adapter in adapters]
    ranks = [int(c["r"]) for c in configs]
    scales = [float(c["lora_alpha"]) / r for c, r in zip(configs, ranks)]
    factors = [_factors(adapter) for adapter in adapters]
    rank = sum(ranks)
    tensors = {}
    for prefix in sorted(set().union(*factors)):
        present = [f[prefix] for f in factors if prefix in f]
        in_features, out_features = present[0][0].shape[1], present[0][1].shape[0]
        a_parts, b_parts = [], []
        for factor, r, scale in zip(factors, ranks, scales):
            if prefix in factor:
                a, b = factor[prefix]
                if a.shape[1] != in_features or b.shape[0] != out_features:
                    raise ValueError(f"{prefix}: the adapters disagree on the module's shape")
                a_parts.append(a)
                b_parts.append(b * scale)
            else:
                a_parts.append(torch.zeros(r, in_features))
                b_parts.append(torch.zeros(out_features, r))
        tensors[prefix + LORA_FACTORS[0]] = torch.cat(a_parts, dim=0).contiguous()
        tensors[prefix + LORA_FACTORS[1]] = torch.cat(b_parts, dim=1).contiguous()
    config = dict(configs[0])
    config.update(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted({module for c in configs for module in c["target_modules"]}),
        layers_to_transform=_union([c.get("layers_to_transform") for c in configs]),
    )
    return config, tensors


def write_stacked(adapters: Sequence[Path], directory: Path, *, tokenizer: bool = True) -> None:
    """Write the stacked adapter into the existing ``directory`` (not atomic: callers write into a staged
    directory). With ``tokenizer`` the last adapter's other files (its tokenizer) travel with it."""
    from safetensors.torch import save_file

    config, tensors = stacked_factors(adapters)
    for item in adapters[-1].iterdir() if tokenizer else ():
        if item.is_file() and item.name not in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(item, directory / item.name)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def stack_adapters(adapters: Sequence[Path], output: Path, *, force: bool = False) -> Path:
    """Write the adapter equal to ``adapters`` applied in order to ``output`` (atomically; refuses to overwrite
    a finished one unless ``force``)."""
    if (output / CONFIG_FILE).exists() and not force:
        raise FileExistsError(f"{output} already holds an adapter; pass force=True to replace it")
    with staged_directory(output) as work:
        write_stacked(adapters, work)
    return output


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--force"]
    if len(arguments) < 3:
        sys.exit("usage: python -m steerserve.training.stack_adapters ADAPTER ADAPTER [ADAPTER ...] OUTPUT [--force]")
    print(stack_adapters([Path(a) for a in arguments[:-1]], Path(arguments[-1]), force="--force" in sys.argv))
