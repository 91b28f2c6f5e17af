"""Model-side half of the transformers engine: batched KV cache, sampling, detokenization, weight size.

Runs in the engine's single worker thread (nothing here is thread-safe)::

    batch = DecodeBatch(model, enable_padded_attention(model)); batch.admit(new_seqs); batch.decode()

Batch invariance: every row keeps its own left padding count, and attention runs
SDPA on each row's unpadded keys (:func:`padded_sdpa_attention`), so a row
computes exactly what it would compute alone (``model.generate`` included):
batched padded SDPA picks different kernel blocking and drifts in bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence as Seq
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from steerserve.server.engines.base import SamplingOptions
from steerserve.server.engines.sampling import sample_tokens

if TYPE_CHECKING:
    from steerserve.loop_guard import LoopWatch

logger = logging.getLogger(__name__)

PADDED_SDPA = "steerserve_padded_sdpa"
_local = threading.local()  # the forward's per-row left padding, seen by the attention function


def padded_sdpa_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA per group of rows with equal padding, each on its unpadded keys (no mask needed)."""
    pads: list[int] | None = getattr(_local, "pads", None)
    if not pads or not any(pads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len > 1 and q_len != kv_len:
        raise RuntimeError("padded attention supports prefill from an empty cache or one-token decode")
    out = query.new_zeros(query.shape[0], q_len, query.shape[1], value.shape[-1])
    groups: dict[int, list[int]] = {}
    for row, pad in enumerate(pads):
        groups.setdefault(pad, []).append(row)
    for pad, rows in groups.items():
        idx = torch.tensor(rows, device=query.device)
        q_from = max(0, pad - (kv_len - q_len))  # prefill: queries at pad positions stay zero
        o, _ = sdpa_attention_forward(
            module, query[idx, :, q_from:], key[idx, :, pad:], value[idx, :, pad:], None, **kwargs
        )
        out[idx, q_from:] = o
    return out, None


AttentionInterface.register(PADDED_SDPA, padded_sdpa_attention)


@contextlib.contextmanager
def _row_padding(pads: list[int]) -> Iterator[None]:
    _local.pads = pads
    try:
        yield
    finally:
        _local.pads = None


def only_full_attention(model: torch.nn.Module) -> bool:
    """Whether every cache layer is a plain DynamicLayer (so caches can be padded and spliced)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def enable_padded_attention(model: Any) -> bool:
    """Switch an sdpa, full-attention model to per-row padded SDPA; False where it can't be."""
    if model.config._attn_implementation != "sdpa" or not only_full_attention(model):
        return False
    try:
        model.set_attn_implementation(PADDED_SDPA)
    except (ValueError, AttributeError) as exc:  # models outside the AttentionInterface
        logger.info("padded attention unavailable (%s); using masked attention", exc)
        return False
    return model.config._attn_implementation == PADDED_SDPA


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (bitsandbytes: packed data plus quantization scales)."""
    total = 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):  # tied weights are listed once
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)  # nf4: per-block absmax (itself quantized, nested)
        extras = [getattr(tensor, "SCB", None), getattr(state, "absmax", None)]
        extras.append(getattr(getattr(state, "state2", None), "absmax", None))
        total += sum(t.numel() * t.element_size() for t in extras if isinstance(t, torch.Tensor))
    return total


class TextTracker:
    """Incremental detokenization with stop strings.

    Decodes a sliding window of ids (TGI/vLLM style), holds back a trailing incomplete
    UTF-8 character and any suffix that could start a stop string.
    """

    def __init__(self, tokenizer: Any, context_ids: Seq[int], stop: Seq[str]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids)  # a few prompt ids: tokenizers that strip a leading space need context
        self._prefix, self._read = 0, len(self._ids)
        self._text, self._sent = "", 0
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max(map(len, self._stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> None:
        self._ids.append(token_id)
        self._advance(final=False)

    def _advance(self, final: bool) -> None:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) > len(prefix_text) and (final or not full.endswith("\ufffd")):
            self._text += full[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)

    def take(self, final: bool) -> tuple[str, bool]:
        """New text to emit, and whether a stop string ended it (text before the stop only)."""
        if final:
            self._advance(final=True)
        cut = self._find_stop()
        if cut is not None:
            out = self._text[self._sent : cut]
            self._sent = len(self._text)
            return out, True
        end = len(self._text) if final else len(self._text) - self._held_back()
        out = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return out, False

    def _find_stop(self) -> int | None:
        hits = [i for s in self._stop if (i := self._text.find(s, self._sent)) != -1]
        return min(hits, default=None)

    def _held_back(self) -> int:
        """Length of the longest unsent suffix that is a proper prefix of a stop string."""
        for k in range(min(self._longest_stop - 1, len(self._text) - self._sent), 0, -1):
            if any(s.startswith(self._text[-k:]) for s in self._stop):
                return k
        return 0


@dataclasses.dataclass(eq=False)
class Sequence:
    """One choice of one request: its tokens, sampler and finish state."""

    index: int
    prompt_ids: list[int]
    options: SamplingOptions
    generator: torch.Generator
    tracker: TextTracker
    eos_ids: frozenset[int]
    max_model_len: int
    owner: Any = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    pending_text: str = ""
    pending_tokens: int = 0
    aborted: bool = False  # set by the event loop; the worker drops the row at its next step
    closed: bool = False  # event-loop side: the final delta was delivered (or the consumer left)
    queued_s: float | None = None

    @functools.cached_property
    def loop_watch(self) -> LoopWatch | None:
        """The loop guard's watch over this choice's output (:mod:`steerserve.loop_guard`), when asked for."""
        from steerserve.loop_guard import LoopWatch

        return LoopWatch(self.options.loop_repeats) if self.options.loop_repeats > 0 else None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.aborted

    def append(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.pending_tokens += 1
        is_eos = token_id in self.eos_ids and not self.options.ignore_eos
        reason = None
        if is_eos:
            reason = "stop"
        elif len(self.output_ids) >= self.options.max_tokens or self.num_tokens >= self.max_model_len:
            reason = "length"
        if not is_eos:  # the EOS token is a signal, not text
            self.tracker.add(token_id)
        text, hit_stop = self.tracker.take(final=reason is not None)
        self.pending_text += text
        self.finish_reason = "stop" if hit_stop else reason

    def take_delta(self) -> tuple[str, int, str | None]:
        text, count = self.pending_text, self.pending_tokens
        self.pending_text, self.pending_tokens = "", 0
        return text, count, self.finish_reason


class DecodeBatch:
    """The running sequences and their shared left-padded KV cache."""

    def __init__(self, model: Any, padded_attention: bool, pad_token_id: int = 0) -> None:
        self.model = model
        self.padded_attention = padded_attention
        # Plain per-layer caches can be left-padded and concatenated; others (sliding windows...)
        # are rebuilt by re-prefilling every row when newcomers join.
        self.mergeable = only_full_attention(model)
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._pads: list[int] = []

    def reset(self) -> None:
        self.rows, self._cache, self._pads = [], None, []

    def drop_done(self) -> None:
        """Remove finished and aborted rows from the batch (and cache columns nobody needs)."""
        keep = [i for i, seq in enumerate(self.rows) if not seq.done]
        if not keep:
            self.reset()
            return
        if len(keep) < len(self.rows):
            assert self._cache is not None
            self._cache.batch_select_indices(torch.tensor(keep, device=self.device))
            self.rows = [self.rows[i] for i in keep]
            self._pads = [self._pads[i] for i in keep]
        trim = min(self._pads)
        if trim and self.mergeable:  # columns that are padding in every row
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
            self._pads = [p - trim for p in self._pads]

    def admit(self, newcomers: list[Sequence]) -> list[Sequence]:
        """Prefill ``newcomers``, sample their first token and add them to the batch."""
        newcomers = [s for s in newcomers if not s.aborted]
        if not newcomers:
            return []
        if self.mergeable:
            cache, pads, logits = self._prefill([s.prompt_ids for s in newcomers])
            self._merge(newcomers, cache, pads)
        else:
            fed = [s.prompt_ids + s.output_ids[:-1] for s in self.rows]  # what each row's cache held
            cache, pads, logits = self._prefill(fed + [s.prompt_ids for s in newcomers])
            logits = logits[len(fed) :]
            self.rows, self._cache, self._pads = self.rows + newcomers, cache, pads
        for seq, token in zip(newcomers, sample_tokens(logits, newcomers)):
            seq.append(token)
        self.drop_done()
        return newcomers

    def decode(self) -> list[Sequence]:
        """One token for every running row, in one forward pass; returns the rows that advanced."""
        rows = list(self.rows)
        if not rows:
            return []
        ids = torch.tensor([[s.output_ids[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[s.num_tokens - 1] for s in rows], device=self.device)
        logits = self._forward(ids, positions, self._pads, self._cache)
        for seq, token in zip(rows, sample_tokens(logits, rows)):
            seq.append(token)
        self.drop_done()
        return rows

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, pads: list[int], cache: DynamicCache
    ) -> torch.Tensor:
        """Last-position float32 logits; positions are explicit because rows are left-padded."""
        kwargs: dict[str, Any] = {}
        context = _row_padding(pads) if self.padded_attention else contextlib.nullcontext()
        if not self.padded_attention:
            columns = torch.arange(cache.get_seq_length() + ids.shape[1], device=self.device)
            kwargs["attention_mask"] = (columns[None] >= torch.tensor(pads, device=self.device)[:, None]).long()
        with context:
            out = self.model(
                input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
                **kwargs,
            )
        return out.logits[:, -1].float()

    def _prefill(self, token_lists: list[list[int]]) -> tuple[DynamicCache, list[int], torch.Tensor]:
        """Left-padded prefill of the distinct lists (n choices share one), expanded back to one row each."""
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(t), len(unique)) for t in token_lists]
        lists = list(unique)
        width = max(map(len, lists))
        pads = [width - len(t) for t in lists]
        ids = torch.full((len(lists), width), self.pad_token_id, dtype=torch.long)
        for i, tokens in enumerate(lists):
            ids[i, pads[i] :] = torch.tensor(tokens)
        positions = (torch.arange(width)[None] - torch.tensor(pads)[:, None]).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids.to(self.device), positions.to(self.device), pads, cache)
        if not self.padded_attention and self.mergeable:
            _zero_padding(cache, pads)
        if len(lists) < len(token_lists):
            cache.batch_select_indices(torch.tensor(rows, device=self.device))
            logits = logits[rows]
        return cache, [pads[r] for r in rows], logits

    def _merge(self, newcomers: list[Sequence], cache: DynamicCache, pads: list[int]) -> None:
        if self._cache is None:
            self.rows, self._cache, self._pads = list(newcomers), cache, pads
            return
        old_len, new_len = self._cache.get_seq_length(), cache.get_seq_length()
        width = max(old_len, new_len)
        for old, new in zip(self._cache.layers, cache.layers):  # right-align both, then stack the rows
            old.keys = torch.cat([_left_pad(old.keys, width - old_len), _left_pad(new.keys, width - new_len)])
            old.values = torch.cat(
                [_left_pad(old.values, width - old_len), _left_pad(new.values, width - new_len)]
            )
        self._pads = [p + width - old_len for p in self._pads] + [p + width - new_len for p in pads]
        self.rows = self.rows + newcomers


def _left_pad(states: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero key/value columns in front of [batch, heads, seq, dim] states."""
    return F.pad(states, (0, 0, columns, 0)) if columns else states


def _zero_padding(cache: DynamicCache, pads: list[int]) -> None:
    """Masked attention multiplies pad values by a zero weight: make sure they are not NaN."""
    for layer in cache.layers:
        for row, pad in enumerate(pads):
            if pad:
                layer.keys[row, :, :pad] = 0
                layer.values[row, :, :pad] = 0
