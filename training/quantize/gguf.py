"""gguf-q8_0 / gguf-q4_k_m: HF Llama checkpoint -> f16 GGUF -> llama.cpp quantization, served by llama.cpp.

    steerserve quantize default --precision gguf-q4_k_m --output runs/smollm2-q4km

The f16 GGUF is written here with the ``gguf`` package (no llama.cpp checkout or
``convert_hf_to_gguf.py`` needed), then ``llama_cpp.llama_model_quantize`` makes the
Q8_0 / Q4_K_M file. The variant directory holds ``model.gguf`` plus the HF tokenizer
files: the server renders and tokenizes with the HF tokenizer and hands token ids to
llama.cpp (the GGUF vocabulary is the same id -> token table, so ids agree).
"""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from steerserve.precision import Precision
from steerserve.training.quantize.methods import MethodResult, QuantizeJob, Unavailable, copy_tokenizer, versions

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install llama-cpp-python==0.3.36 (compiles ~10 min; extra: '.[llamacpp]')"
MODEL_FILE = "model.gguf"
FTYPES = {Precision.GGUF_Q8_0: "LLAMA_FTYPE_MOSTLY_Q8_0", Precision.GGUF_Q4_K_M: "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# gguf token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def check(precision: Precision) -> None:
    """One-line refusal when llama-cpp-python (quantizer and engine) or gguf (writer) is missing."""
    for module in ("llama_cpp", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed, so {precision.value} cannot be made or served; "
                              f"{INSTALL_HINT}")


def quantize(job: QuantizeJob, work: Path) -> MethodResult:
    """Write f16 GGUF, quantize it with llama.cpp to ``model.gguf``, copy the tokenizer next to it."""
    check(job.precision)
    f16 = work / "model-f16.gguf.tmp"
    try:
        write_f16_gguf(job.source, f16)
        llama_quantize(f16, work / MODEL_FILE, FTYPES[job.precision])
    finally:
        f16.unlink(missing_ok=True)
    copy_tokenizer(job.source, work)
    shutil.copy2(job.source / "config.json", work / "config.json")  # AutoTokenizer may consult it
    return MethodResult(
        method=f"llama.cpp {FTYPES[job.precision].removeprefix('LLAMA_FTYPE_MOSTLY_')} (f16 GGUF via gguf-py)",
        libraries=versions("llama_cpp_python", "gguf", "torch", "safetensors"),
        scorer="llama.cpp",
        settings={"ftype": FTYPES[job.precision], "intermediate": "f16 GGUF, q/k permuted for llama.cpp rope"},
        notes=["the server tokenizes with the HF tokenizer copied here and passes ids to llama.cpp",
               "tensors whose rows do not fit the quant block size fall back to llama.cpp's fallback type"],
    )


# ---- HF -> f16 GGUF -----------------------------------------------------------------------------


def _hf_config(source: Path) -> dict[str, Any]:
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise Unavailable(f"only Llama-architecture checkpoints convert to GGUF here (got {config.get('model_type')})")
    return config


def _rope_theta(config: dict[str, Any]) -> float:
    """transformers 5 keeps it in rope_parameters, 4.x at the top level."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _add_hparams(writer: Any, config: dict[str, Any]) -> None:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16


def _add_tokenizer(writer: Any, source: Path, config: dict[str, Any]) -> None:
    """The tokenizer.json BPE table as a ``gpt2`` GGUF vocabulary, padded to the embedding rows."""
    data = json.loads((source / "tokenizer.json").read_text())
    if data["model"]["type"] != "BPE":
        raise Unavailable(f"only byte-level BPE tokenizers convert to GGUF here (got {data['model']['type']})")
    tokens: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], CONTROL if added["special"] else USER_DEFINED)
    size = max(config["vocab_size"], max(tokens) + 1)
    table = [tokens.get(i, (f"[PAD{i}]", UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # only for llama.cpp's own tokenizer, which the server never uses
    writer.add_token_list([t for t, _ in table])
    writer.add_token_types([k for _, k in table])
    writer.add_token_merges(merges)
    tok_config = json.loads((source / "tokenizer_config.json").read_text()) \
        if (source / "tokenizer_config.json").is_file() else {}
    ids = {content: i for i, (content, _) in enumerate(table)}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id)):
        token_id = config.get(f"{key}_id")
        if token_id is None and isinstance(tok_config.get(key), str):
            token_id = ids.get(tok_config[key])
        if token_id is not None:
            add(int(token_id if not isinstance(token_id, list) else token_id[0]))
    writer.add_add_bos_token(False)  # the HF tokenizer (and the chat template) decide about BOS
    template = _chat_template(source, tok_config)
    if template:
        writer.add_chat_template(template)


def _chat_template(source: Path, tok_config: dict[str, Any]) -> str | None:
    if (source / "chat_template.jinja").is_file():
        return (source / "chat_template.jinja").read_text()
    template = tok_config.get("chat_template")
    return template if isinstance(template, str) else None


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate_half layout -> llama.cpp's interleaved rope pairs (llama.cpp converter's ``permute``)."""
    rest = weight.shape[1:]
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _load_tensors(source: Path) -> dict[str, np.ndarray]:
    """Every safetensors tensor as float32 numpy (bf16 has no numpy dtype, so go through torch)."""
    from safetensors.torch import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update({k: v.float().numpy() for k, v in load_file(str(file)).items()})
    if not tensors:
        raise FileNotFoundError(f"{source} has no *.safetensors weights")
    return tensors


def _gguf_tensors(source: Path, config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) pairs: q/k permuted, matrices f16, norms f32; tied output left out."""
    import gguf

    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    out = []
    for hf_name, array in _load_tensors(source).items():
        if "rotary_emb" in hf_name:
            continue
        if hf_name.endswith("q_proj.weight"):
            array = permute_rope(array, n_head)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_rope(array, n_kv)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise Unavailable(f"no GGUF name for tensor {hf_name}")
        out.append((name, array.astype(np.float16 if array.ndim == 2 else np.float32)))
    return out  # tied embeddings: no output.weight, llama.cpp then reuses token_embd


def write_f16_gguf(source: Path, path: Path) -> None:
    """An f16 GGUF of ``source`` (llama metadata, gpt2 BPE vocabulary, permuted q/k)."""
    import gguf

    config = _hf_config(source)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(source.name)
    _add_hparams(writer, config)
    _add_tokenizer(writer, source, config)
    for name, array in _gguf_tensors(source, config):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote f16 GGUF %s (%.1f MB)", path, path.stat().st_size / 1e6)


def llama_quantize(source: Path, target: Path, ftype: str) -> None:
    """``llama_model_quantize`` with its default parameters but the requested file type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not target.is_file():
        raise RuntimeError(f"llama_model_quantize to {ftype} failed (code {code})")
    logger.info("quantized to %s: %s (%.1f MB)", ftype, target, target.stat().st_size / 1e6)


# ---- quality ------------------------------------------------------------------------------------


def find_gguf(model_dir: Path) -> Path:
    """The variant's GGUF file (``model.gguf``, else the only ``*.gguf``)."""
    model_dir = Path(model_dir)
    if (model_dir / MODEL_FILE).is_file():
        return model_dir / MODEL_FILE
    found = sorted(model_dir.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"{model_dir} holds {len(found)} .gguf files; expected one")
    return found[0]


def load_llama(model_dir: Path, n_ctx: int, seed: int = 0, logits_all: bool = False, **overrides: Any) -> Any:
    """One llama.cpp model on all cores; by default logits of the last position only (read by us).

    ``overrides`` are further ``Llama`` arguments (``n_threads``, ``n_threads_batch``, ``flash_attn``...), e.g.
    a served variant's ``engine_args``; a name ``Llama`` does not take is a ValueError naming it, since
    ``Llama`` would otherwise swallow it silently in its ``**kwargs``.
    """
    from llama_cpp import Llama

    known = set(inspect.signature(Llama.__init__).parameters) - {"self", "kwargs", "model_path"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"llama.cpp takes no argument {', '.join(unknown)} (it takes e.g. n_threads, "
                         "n_threads_batch, n_batch, flash_attn)")
    threads = overrides.pop("n_threads", None) or os.cpu_count() or 1
    arguments: dict[str, Any] = {"n_ctx": n_ctx, "n_batch": min(n_ctx, 512), "n_threads": threads,
                                 "logits_all": logits_all, "seed": seed, "verbose": False}
    return Llama(model_path=str(find_gguf(model_dir)), **(arguments | overrides))


def last_logits(llama: Any) -> np.ndarray:
    """The last evaluated position's float32 logits: a view of llama.cpp's buffer, valid until the next eval."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),))


def last_logprobs(llama: Any) -> np.ndarray:
    """Full-vocabulary float64 log-softmax of the last evaluated position's logits."""
    logits = last_logits(llama).astype(np.float64)
    top = logits.max()
    return logits - top - math.log(np.exp(logits - top).sum())


def eval_prompt(llama: Any, ids: list[int]) -> None:
    """Evaluate ``ids`` reusing the cached common prefix (at least the last id is evaluated again)."""
    cached = llama.input_ids[: llama.n_tokens].tolist()
    keep = 0
    while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
        keep += 1
    llama.n_tokens = keep
    llama.eval(ids[keep:])


def score_gguf(model_dir: Path, eval_set: dict[str, Any]) -> dict[str, Any]:
    """Raw log-probs as scoring.score_eval_set returns them, computed by llama.cpp.

    Perplexity windows run as one batch with ``logits_all`` (one token at a time is ~7x
    slower on CPU); every row is log-softmaxed in float64 over the full vocabulary.
    """
    lengths = [len(s) for s in eval_set["sequences"]] + [len(m["ids"]) for m in eval_set["mcq"]]
    llama = load_llama(model_dir, n_ctx=max(lengths, default=16) + 1, logits_all=True)
    try:
        token_logprobs = []
        for ids in eval_set["sequences"]:
            llama.reset()
            llama.eval(ids)
            logits = llama.scores[: len(ids) - 1].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            token_logprobs.append(logprobs[np.arange(len(ids) - 1), ids[1:]].tolist())
        mcq_logprobs = []
        for item in eval_set["mcq"]:
            eval_prompt(llama, item["ids"])
            mcq_logprobs.append([float(x) for x in last_logprobs(llama)[item["candidates"]]])
    finally:
        llama.close()
    return {"token_logprobs": token_logprobs, "mcq_logprobs": mcq_logprobs}
