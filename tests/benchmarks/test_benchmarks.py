"""Each benchmark in --quick mode on the tiny model: JSON + markdown + a real PNG, on a started or a given server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from steerserve.benchmarks.cli import main
from steerserve.measures import FK_MEASURE, chars, fk_grade
from steerserve.benchmarks.servers import parse_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _outputs(folder: Path, name: str) -> dict:
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert "| variant |" in (folder / f"{name}.md").read_text() or "| runtime |" in (folder / f"{name}.md").read_text()
    return json.loads((folder / f"{name}.json").read_text())


@pytest.fixture
def data_files(tmp_path: Path) -> tuple[Path, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe the number {i}."}) + "\n" for i in range(3)))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4})
                                 + "\n" for i in range(6)))
    return prompts, questions


def test_all_benchmarks_on_a_started_server(tiny_model_dir: Path, tmp_path: Path, data_files) -> None:
    prompts, questions = data_files
    out = tmp_path / "results"
    code = main(["all", "--quick", "--output", str(out), "--variant", f"{tiny_model_dir},name=tiny,engine=transformers",
                 "--server-arg=--max-model-len=512", "--prompts", str(prompts),
                 "--mcq-set", f"mine={questions}:mcq", "--mcq-set", f"again={questions}", "--max-tokens", "8"])
    assert code == 0
    latency = _outputs(out, "latency_memory")
    served = latency["variants"]["tiny:bf16 (transformers)"]
    assert served["single_tokens_per_s"] > 0 and served["batched_tokens_per_s"] > 0 and served["ttft_s"] > 0
    assert served["weight_bytes"] > 100_000 and served["peak_rss_bytes"] > served["weight_bytes"]
    assert served["long_prompt_ttft_s"] > 0 and served["long_prompt_tokens"] > 40  # --quick: ~64-token prompt
    reference = next(v for k, v in latency["references"].items() if k.startswith("hf-generate"))
    assert reference["single_tokens_per_s"] > 0 and reference["peak_rss_bytes"] > 0
    steer = _outputs(out, "steerability")["variants"]["tiny:bf16 (transformers)"]
    assert set(steer["summary"]) == {"verbosity", "complexity"} and len(steer["answers"]) == 2 * 5 * 2
    mcq = _outputs(out, "mcq")["variants"]["tiny:bf16 (transformers)"]
    assert mcq["mine"]["total"] == 6 and 0 <= mcq["mine"]["accuracy"] <= 1 and mcq["again"] == {**mcq["mine"],
                                                                                                 "seconds": mcq["again"]["seconds"]}
    summary = (out / "SUMMARY.md").read_text()
    assert "## latency_memory" in summary and "## steerability" in summary and "paper (HelpSteer)" in summary


def test_latency_memory_measures_the_server_against_the_same_vllm_engine_offline(tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "latency"
    code = main(["latency_memory", "--quick", "--output", str(out), "--variant", f"{tiny_model_dir},name=tiny",
                 "--server-arg=--max-model-len=512", "--max-tokens", "8"])
    assert code == 0
    latency = _outputs(out, "latency_memory")
    served = latency["variants"]["tiny:bf16 (vllm)"]
    offline = latency["references"]["vLLM offline (tiny:bf16)"]
    assert offline["single_tokens_per_s"] > 0 and offline["batched_tokens_per_s"] > 0 and offline["concurrency"] == 4
    assert offline["peak_rss_bytes"] > offline["weight_bytes"] > 100_000
    assert offline["prompt_tokens"] == served["prompt_tokens"] > 5  # the prompt the server renders, token for token
    overhead = latency["server_overhead"]["tiny:bf16 (vllm)"]
    assert overhead["single_tokens_per_s"] == pytest.approx(
        1 - served["single_tokens_per_s"] / offline["single_tokens_per_s"])
    assert set(overhead) == {"single_tokens_per_s", "batched_tokens_per_s"}
    through_async = latency["references"]["vLLM async (tiny:bf16)"]  # same engine, requests as the server sends them
    assert through_async["prompt_tokens"] == served["prompt_tokens"] and through_async["concurrency"] == 4
    split = latency["server_overhead_split"]["tiny:bf16 (vllm)"]["batched_tokens_per_s"]
    assert split["vllm_async_path"] == pytest.approx(
        1 - through_async["batched_tokens_per_s"] / offline["batched_tokens_per_s"])
    assert split["our_server"] == pytest.approx(1 - served["batched_tokens_per_s"] / through_async["batched_tokens_per_s"])
    markdown = (out / "latency_memory.md").read_text()
    assert "server overhead vs vLLM offline, tiny:bf16 (vllm): single stream" in markdown
    assert "of which, tiny:bf16 (vllm): single stream: vLLM's async path" in markdown


def _untrained_apm(model_dir: Path, out: Path) -> None:
    """An APM head on the tiny model, untrained: enough to check the no-collapse scoring's wiring."""
    from steerserve.training.apm import load_apm

    apm, tokenizer, _ = load_apm(str(model_dir), ["helpfulness", "verbosity"])
    apm.save_pretrained(out)
    tokenizer.save_pretrained(out)


def test_steerability_on_a_given_server(bench_server, tmp_path: Path, data_files, tiny_model_dir: Path) -> None:
    from steerserve.attributes import ATTRIBUTE_DEFAULTS

    _untrained_apm(tiny_model_dir, tmp_path / "apm")
    prompts, _ = data_files
    assert main(["steerability", "--quick", "--url", bench_server.url, "--output", str(tmp_path),
                 "--prompts", str(prompts), "--num-prompts", "1", "--answer-tokens", "8",
                 "--apm", str(tmp_path / "apm")]) == 0
    result = _outputs(tmp_path, "steerability")
    variant = result["variants"]["tiny:bf16 (transformers)"]
    summary = variant["summary"]
    assert set(summary["verbosity"]["chars"]) == {"0", "1", "2", "3", "4"}
    answers = variant["answers"]
    assert len(answers) == 10  # 2 sliders x 5 levels x 1 prompt, though the shared default request ran once
    at_default = [a for a in answers if a["level"] == ATTRIBUTE_DEFAULTS[a["slider"]]]
    assert len(at_default) == 2 and at_default[0]["text"] == at_default[1]["text"]
    assert set(summary["verbosity"]["target"]) == {"monotone", "ratio", "goal", "met"}
    assert set(variant["default_slider_apm"]) == {"helpfulness", "verbosity"}
    assert result["paper"]["verbosity"]["chars"] == {"0": 422.0, "4": 1125.0}
    assert "no-collapse" in (tmp_path / "steerability.md").read_text()
    assert variant["reading_level_guidance"] == 2.0  # the server's default, from its model card
    assert "reading-level guidance, logits per syllable at level 0: tiny:bf16 (transformers) 2" in (
        tmp_path / "steerability.md").read_text()
    assert variant["verbosity_guidance"] == 6.0
    assert "verbosity guidance, end-token logits at level 0: tiny:bf16 (transformers) 6" in (
        tmp_path / "steerability.md").read_text()


def _one_prompt_sweep(url: str, data_files) -> list[str]:
    prompts, _ = data_files
    return ["steerability", "--quick", "--url", url, "--prompts", str(prompts), "--num-prompts", "1",
            "--answer-tokens", "8"]


def _refused(args: list[str], out: Path) -> None:
    """A bad flag value stops the benchmark before it asks or writes anything (argparse's exit 2)."""
    with pytest.raises(SystemExit) as bad:
        main([*args, "--output", str(out)])
    assert bad.value.code == 2 and not out.exists()


def test_steerability_holds_other_sliders(bench_server, tmp_path: Path, data_files) -> None:
    """--hold goes through the attribute codec; the sweeps share the request where both hold the same line."""
    args = _one_prompt_sweep(bench_server.url, data_files)
    _refused([*args, "--hold", "quality:7"], tmp_path / "bad")
    assert main([*args, "--output", str(tmp_path), "--hold", "quality:3,complexity:1"]) == 0
    result = _outputs(tmp_path, "steerability")
    answers = result["variants"]["tiny:bf16 (transformers)"]["answers"]
    text = {(a["slider"], a["level"]): a["text"] for a in answers}
    assert len(answers) == 10 and text[("verbosity", 4)] == text[("complexity", 1)]  # verbosity 4, complexity 1
    assert result["config"]["hold"] == {"quality": 3, "complexity": 1}
    assert "except quality 3, complexity 1" in (tmp_path / "steerability.md").read_text()


def test_steerability_sweeps_only_the_sliders_asked_for(bench_server, tmp_path: Path, data_files) -> None:
    args = _one_prompt_sweep(bench_server.url, data_files)
    _refused([*args, "--sliders", "length"], tmp_path / "bad")
    assert main([*args, "--output", str(tmp_path), "--sliders", "complexity"]) == 0
    result = _outputs(tmp_path, "steerability")
    variant = result["variants"]["tiny:bf16 (transformers)"]
    assert {a["slider"] for a in variant["answers"]} == {"complexity"} and len(variant["answers"]) == 5
    assert set(variant["summary"]) == {"complexity"} and result["config"]["sliders"] == ["complexity"]
    text = (tmp_path / "steerability.md").read_text()
    assert "by **complexity** level" in text and "by **verbosity** level" not in text
    grades = sorted(a["fkgl"] for a in variant["answers"] if a["level"] == 0)
    assert variant["summary"]["complexity"]["median"]["0"] == pytest.approx(grades[0]) and "median L0-L4" in text


def test_a_finished_result_is_measured_again_from_its_answers(bench_server, tmp_path: Path, data_files) -> None:
    """--rescore rebuilds the outputs from the stored texts: the same numbers while the measures are the same,
    today's grade for an answer whose stored grade is stale, the run's own settings, and no server asked."""
    import gzip

    assert main([*_one_prompt_sweep(bench_server.url, data_files), "--output", str(tmp_path / "run"),
                 "--sliders", "complexity"]) == 0
    stored = json.loads((tmp_path / "run" / "steerability.json").read_text())
    assert stored["measures"]["fkgl"] == FK_MEASURE
    assert main(["steerability", "--rescore", str(tmp_path / "run" / "steerability.json"),
                 "--output", str(tmp_path / "same")]) == 0
    same = _outputs(tmp_path / "same", "steerability")
    label = "tiny:bf16 (transformers)"
    assert same["variants"][label]["summary"] == stored["variants"][label]["summary"]
    assert same["config"] == stored["config"] and same["rescored"]["fkgl"] == FK_MEASURE

    listing = "Steps:\n\n- Open the box\n- Take the cup\n- Pour the tea\n\n```python\nprint(sorted(values))\n```"
    stale = stored["variants"][label]["answers"][0]
    stale.update(text=listing, fkgl=42.0)
    old = tmp_path / "old.json.gz"
    with gzip.open(old, "wt") as handle:
        json.dump(stored, handle)
    assert main(["steerability", "--rescore", str(old), "--output", str(tmp_path / "new")]) == 0
    new = _outputs(tmp_path / "new", "steerability")
    level = str(stale["level"])
    answers = new["variants"][label]["answers"]
    assert answers[0]["fkgl"] == pytest.approx(fk_grade(listing)) and answers[0]["fkgl"] < 4
    assert new["variants"][label]["summary"]["complexity"]["fkgl"][level] == pytest.approx(
        sum(a["fkgl"] for a in answers if str(a["level"]) == level) / sum(str(a["level"]) == level for a in answers))
    assert "Re-measured" in (tmp_path / "new" / "steerability.md").read_text()

    _refused(["latency_memory", "--rescore", str(old)], tmp_path / "bad")
    (tmp_path / "latency.json").write_text(json.dumps({"variants": {label: {"summary": {}}}}))
    _refused(["steerability", "--rescore", str(tmp_path / "latency.json")], tmp_path / "bad")
    _refused(["steerability", "--rescore", str(tmp_path / "missing.json")], tmp_path / "bad")


def test_results_are_joined_on_the_prompts_all_of_them_answered(bench_server, tmp_path: Path, data_files,
                                                               tiny_model_dir: Path) -> None:
    """--rescore A B writes one table: every variant cut to the prompts all answered (a longer reference beside a
    shorter sweep), a shared label told apart by its source, each slider's table holding the variants that swept
    it; --apm scores every variant's default-slider answers with one APM; results answered under another cap are
    refused."""
    prompts, _ = data_files
    sweep = ["steerability", "--quick", "--url", bench_server.url, "--prompts", str(prompts), "--answer-tokens", "8"]
    assert main([*sweep, "--num-prompts", "2", "--sliders", "verbosity", "--output", str(tmp_path / "two")]) == 0
    assert main([*sweep, "--num-prompts", "1", "--sliders", "complexity", "--output", str(tmp_path / "one")]) == 0
    two, one = (tmp_path / name / "steerability.json" for name in ("two", "one"))
    assert main(["steerability", "--rescore", str(two), str(one), "--output", str(tmp_path / "joined")]) == 0

    joined = _outputs(tmp_path / "joined", "steerability")
    label = "tiny:bf16 (transformers)"
    assert list(joined["variants"]) == [label, f"{label} [one]"] and joined["config"]["num_prompts"] == 1
    longer = json.loads(two.read_text())["variants"][label]
    kept = joined["variants"][label]
    assert kept["prompts"] == longer["prompts"][:1] == joined["variants"][f"{label} [one]"]["prompts"]
    assert [a["text"] for a in kept["answers"]] == [a["text"] for a in longer["answers"] if a["prompt"] == 0]
    assert len(longer["answers"]) == 2 * len(kept["answers"]) == 10 and set(kept["summary"]) == {"verbosity"}
    verbosity_table, complexity_table = (tmp_path / "joined" / "steerability.md").read_text().split("**complexity**")
    assert f"| {label} [one] |" not in verbosity_table and f"| {label} [one] |" in complexity_table

    _untrained_apm(tiny_model_dir, tmp_path / "apm")
    assert "default_slider_apm" not in longer  # swept without an APM: scored afterwards, both by the same one
    assert main(["steerability", "--rescore", str(two), str(one), "--apm", str(tmp_path / "apm"),
                 "--output", str(tmp_path / "scored")]) == 0
    scored = _outputs(tmp_path / "scored", "steerability")
    own = [scored["variants"][name]["default_slider_apm"] for name in (label, f"{label} [one]")]
    assert all(set(values) == {"helpfulness", "verbosity"} for values in own)
    assert all(math.isfinite(value) for values in own for value in values.values())
    assert scored["rescored"]["apm"] == str(tmp_path / "apm")
    assert "no-collapse" in (tmp_path / "scored" / "steerability.md").read_text()
    _refused(["steerability", "--rescore", str(two), "--apm", str(tmp_path / "two")], tmp_path / "bad")
    _refused([*sweep, "--apm", str(tmp_path / "two")], tmp_path / "bad")  # refused before a sweep, not after it

    capped = json.loads(one.read_text())
    capped["variants"][label]["max_tokens"] = 4
    (tmp_path / "capped.json").write_text(json.dumps(capped))
    _refused(["steerability", "--rescore", str(two), str(tmp_path / "capped.json")], tmp_path / "bad")


def test_steerability_sampled_answers_are_seeded(bench_server, tmp_path: Path, data_files) -> None:
    """--temperature samples with seed + prompt index: the same command gives the same answers, unlike greedy."""
    prompts, _ = data_files
    args = ["steerability", "--quick", "--url", bench_server.url, "--prompts", str(prompts), "--num-prompts", "2",
            "--answer-tokens", "12"]
    texts = {}
    for run, extra in (("a", ["--temperature", "1.5", "--seed", "7"]), ("b", ["--temperature", "1.5", "--seed", "7"]),
                       ("greedy", [])):
        assert main([*args, *extra, "--output", str(tmp_path / run)]) == 0
        result = _outputs(tmp_path / run, "steerability")["variants"]["tiny:bf16 (transformers)"]
        texts[run] = [(a["slider"], a["level"], a["prompt"], a["text"]) for a in result["answers"]]
        if run == "a":
            assert result["decoding"] == {"temperature": 1.5, "top_p": 1.0, "seed": 7}
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["greedy"]
    assert "sampled at temperature 1.5, top-p 1, seed 7 + prompt index" in (tmp_path / "a/steerability.md").read_text()
    assert ", greedy, max 12 tokens" in (tmp_path / "greedy/steerability.md").read_text()


def test_steerability_sends_the_openai_penalties(bench_server, tmp_path: Path, data_files) -> None:
    """--frequency-penalty / --presence-penalty reach the server with every answer and name the decoding."""
    prompts, _ = data_files
    args = ["steerability", "--quick", "--url", bench_server.url, "--prompts", str(prompts), "--num-prompts", "2",
            "--answer-tokens", "16", "--sliders", "verbosity"]
    texts = {}
    for run, extra in (("penalised", ["--frequency-penalty", "2", "--presence-penalty", "1.5"]), ("greedy", [])):
        assert main([*args, *extra, "--output", str(tmp_path / run)]) == 0
        result = _outputs(tmp_path / run, "steerability")["variants"]["tiny:bf16 (transformers)"]
        texts[run] = [a["text"] for a in result["answers"]]
        if extra:
            assert result["decoding"] == {"temperature": 0.0, "frequency_penalty": 2.0, "presence_penalty": 1.5}
    assert texts["penalised"] != texts["greedy"]
    report = (tmp_path / "penalised/steerability.md").read_text()
    assert "greedy with frequency penalty 2, presence penalty 1.5" in report


def test_steerability_spreads_its_prompts_across_the_set(bench_server, tmp_path: Path) -> None:
    """--spread-prompts takes every k-th prompt (a set ordered by category gives each category its share)."""
    prompts = tmp_path / "ordered.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Category {i // 2}, prompt {i}."}) + "\n" for i in range(8)))
    args = ["steerability", "--quick", "--url", bench_server.url, "--prompts", str(prompts), "--num-prompts", "2",
            "--answer-tokens", "4", "--sliders", "verbosity"]
    for name, extra, expected in (("first", [], [0, 1]), ("spread", ["--spread-prompts"], [0, 4])):
        assert main([*args, *extra, "--output", str(tmp_path / name)]) == 0
        result = _outputs(tmp_path / name, "steerability")["variants"]["tiny:bf16 (transformers)"]
        assert result["prompts"] == [f"Category {i // 2}, prompt {i}." for i in expected]
        assert {a["prompt"] for a in result["answers"]} == {0, 1}


def test_a_sweep_stopped_mid_variant_goes_on_from_its_logged_answers(bench_server, tmp_path: Path,
                                                                     data_files) -> None:
    from steerserve.attributes import resolve_attributes
    from steerserve.benchmarks.partial import PartialResults
    from steerserve.benchmarks.steerability import answer_id

    prompts, _ = data_files
    label = "tiny:bf16 (transformers)"

    def bench(out: Path, *extra: str) -> dict:
        assert main(["steerability", "--quick", "--url", bench_server.url, "--output", str(out), "--prompts",
                     str(prompts), "--num-prompts", "1", "--answer-tokens", "8", *extra]) == 0
        assert not (out / ".partial").exists()  # the answer log goes with the outputs' writing
        return _outputs(out, "steerability")

    first = bench(tmp_path / "first")
    texts = first["variants"][label]["prompts"]
    # The outputs write an undefined grade as null; the log keeps the answer as measured (NaN).
    answers = [{k: float("nan") if v is None else v for k, v in a.items()} for a in first["variants"][label]["answers"]]

    # Answers are logged under the server's strengths and loop guard (its model card).
    guidance = [first["variants"][label][key] for key in ("reading_level_guidance", "verbosity_guidance", "loop_guard")]

    def logged_id(answer: dict) -> str:
        line = tuple(sorted(resolve_attributes({answer["slider"]: answer["level"]}).items()))
        return answer_id(texts[answer["prompt"]], answer["prompt"], line, *guidance)

    # What a run killed mid-variant leaves: three answers logged (one marked), and a line cut short by the kill.
    for out, config in ((tmp_path / "again", first["config"]), (tmp_path / "other", {**first["config"], "seed": 9})):
        with PartialResults(out, config).answer_log("steerability", label) as log:
            for answer in answers[:3]:
                log.append(logged_id(answer), {**answer, "text": "LOGGED BEFORE THE KILL", "fkgl": 99.0}
                           if answer is answers[0] else answer)
        with log.path.open("a") as cut:
            cut.write('{"id": "0|complexity:0')
    again = bench(tmp_path / "again", "--request-timeout", "900")["variants"][label]["answers"]  # waits longer
    assert [a["text"] for a in again[:1]] == ["LOGGED BEFORE THE KILL"]  # not asked again,
    assert again[0]["fkgl"] == pytest.approx(fk_grade("LOGGED BEFORE THE KILL"))  # but measured by today's measures
    assert [a["text"] for a in again[1:]] == [a["text"] for a in answers[1:]]  # the rest asked (greedy: the same)
    other = bench(tmp_path / "other")["variants"][label]["answers"]  # a log of other arguments is not this run's
    assert [a["text"] for a in other] == [a["text"] for a in answers]


def test_parse_metrics() -> None:
    text = ('# HELP x\nsteerserve:process_tree_resident_memory_bytes 1.5e+08\n'
            'steerserve:model_weight_bytes{model_name="a:bf16",precision="bf16",engine="vllm"} 2.0e+06\n')
    samples = parse_metrics(text)
    assert samples["steerserve:process_tree_resident_memory_bytes"] == [("", 1.5e8)]
    assert samples["steerserve:model_weight_bytes"][0][1] == 2e6


def test_mcq_heldout_part_is_what_training_held_out(tmp_path: Path, data_files) -> None:
    """--mcq-heldout scores exactly the rows an MCQ SFT run with that test_fraction never trained on."""
    import argparse

    from steerserve.benchmarks.mcq_accuracy import load_sets
    from steerserve.training import runner
    from steerserve.training.config import load_config
    from steerserve.training.data.mcq import load_mcq_rows
    from steerserve.training.sft import SFTRecipeConfig

    questions = tmp_path / "many.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4})
                                 + "\n" for i in range(40)))
    args = argparse.Namespace(mcq_set=[f"mine={questions}:mcq"], mcq_limit=100, quick=False, mcq_heldout=0.2)
    benched = load_sets(args)["mine"]["rows"]
    config = load_config(SFTRecipeConfig, None, [f"data={questions}", "data_format=mcq", "test_fraction=0.2"])
    train, test, _ = runner.load_and_split(config, lambda d, f: load_mcq_rows(d, f, "train", 0))
    assert benched == test and len(test) == 8 and not any(row in train for row in benched)


def test_quantized_variants_are_compared_with_their_16_bit_source(tmp_path: Path) -> None:
    from steerserve.benchmarks.latency_memory import reference_checkpoint

    source = tmp_path / "bf16"
    source.mkdir()
    (source / "manifest.json").write_text(json.dumps({"precision": "bf16"}))
    quantized = tmp_path / "w8a8"
    quantized.mkdir()
    (quantized / "manifest.json").write_text(json.dumps({"precision": "w8a8", "source": {"path": str(source)}}))
    orphan = tmp_path / "nf4"
    orphan.mkdir()
    (orphan / "manifest.json").write_text(json.dumps({"precision": "nf4", "source": {"path": str(tmp_path / "gone")}}))
    assert reference_checkpoint(str(quantized)) == str(source)
    assert reference_checkpoint(str(source)) == str(source)
    assert reference_checkpoint(str(orphan)) == str(orphan)  # source moved away: nothing better to compare with
    assert reference_checkpoint(str(tmp_path)) == str(tmp_path)  # no manifest


def test_an_interrupted_run_goes_on_from_the_variants_it_finished(bench_server, tmp_path: Path, data_files) -> None:
    from steerserve.benchmarks.partial import PartialResults

    prompts, _ = data_files
    label = "tiny:bf16 (transformers)"

    def bench(out: Path, *extra: str) -> dict:
        assert main(["steerability", "--quick", "--url", bench_server.url, "--output", str(out), "--prompts",
                     str(prompts), "--num-prompts", "1", "--answer-tokens", "8", *extra]) == 0
        assert not (out / ".partial").exists()  # dropped once the outputs are written
        return _outputs(out, "steerability")

    first = bench(tmp_path / "first")
    # What a run killed after its first variant leaves behind: that variant's result, marked to tell it apart.
    kept = json.loads(json.dumps(first["variants"][label]))
    kept["answers"][0]["text"] = "KEPT FROM THE INTERRUPTED RUN"
    for summary in kept["summary"].values():  # saved by a version that predates a summary field
        del summary["looping"]
    PartialResults(tmp_path / "again", first["config"]).save("steerability", {label: kept})
    again = bench(tmp_path / "again")
    assert again["variants"][label]["answers"][0]["text"] == "KEPT FROM THE INTERRUPTED RUN"  # not answered again
    # ... but measured again with today's measures, its summary rebuilt with every field
    assert again["variants"][label]["answers"][0]["chars"] == chars("KEPT FROM THE INTERRUPTED RUN")
    assert all("looping" in summary for summary in again["variants"][label]["summary"].values())
    # Other measurement arguments: the partial result is not theirs, so everything is measured.
    PartialResults(tmp_path / "other", first["config"]).save("steerability", {label: kept})
    other = bench(tmp_path / "other", "--answer-tokens", "6")
    assert other["variants"][label]["answers"][0]["text"] != "KEPT FROM THE INTERRUPTED RUN"
