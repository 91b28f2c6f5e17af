"""The SteerLM data chain the steered default model is built with, on the tiny model:
bootstrap (samples across instructed levels) -> annotate (APM + measured verbosity/complexity)
-> acsft in the ``described`` format -> the renderer gives the server the same prompt text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from training_helpers import FAST, guided_pair, run_recipe

from steerserve.measures import (FK_GRADE_BOUNDS, complexity_level, fk_grade, relative_complexity_levels,
                                 verbosity_levels)
from steerserve.prompts import ATTRIBUTE_TURN, SteeringMethod, render_chat, steering_instruction
from steerserve.training.bootstrap import BootstrapConfig, grade_spread, render_requests, sample_plan
from steerserve.training.config import ConfigError, load_config
from steerserve.training.manifest import read_manifest
from steerserve.training.sampling import sample

SAMPLE = ["max_tokens=12", "samples_per_prompt=5", "engine=transformers", "limit=3"]


@pytest.fixture(scope="module")
def bootstrap_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, attribute_file: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "bootstrap"
    return run_recipe("bootstrap", out, [f"model={tiny_model_dir}", f"data={attribute_file}",
                                         "data_format=helpsteer", *SAMPLE])


def test_plan_covers_every_level_per_prompt() -> None:
    config = load_config(BootstrapConfig, None, ["data=x.jsonl", "data_format=oasst"])
    plan = sample_plan(["p0", "p1"], config)
    for prompt in ("p0", "p1"):
        entries = [e for e in plan if e["prompt"] == prompt]
        assert sorted(e["instructed"]["verbosity"] for e in entries) == [0, 1, 2, 3, 4]
        assert sorted(e["instructed"]["complexity"] for e in entries) == [0, 1, 2, 3, 4]
    assert plan == sample_plan(["p0", "p1"], config)  # deterministic by seed


def test_a_second_round_of_samples_pairs_the_levels_anew() -> None:
    config = load_config(BootstrapConfig, None, ["data=x.jsonl", "data_format=oasst", "samples_per_prompt=10"])
    plan = sample_plan(["p0", "p1", "p2"], config)
    for prompt in ("p0", "p1", "p2"):
        cells = [(e["instructed"]["verbosity"], e["instructed"]["complexity"]) for e in plan if e["prompt"] == prompt]
        assert len(cells) == 10 and len(set(cells)) == 10
        for axis in (0, 1):  # verbosity, complexity: each level twice
            assert sorted(cell[axis] for cell in cells) == [level for level in range(5) for _ in (0, 1)]


def test_grade_spread_is_the_median_grade_of_finished_samples() -> None:
    plain, technical = "The cat sat. It was big.", "Thermodynamic irreversibility characterises macroscopic processes."
    code = "```python\nprint(sorted(values))\n```"  # no prose, no reading level: left out
    samples = [{"response": text, "instructed": {"complexity": level}, "finish_reason": finish}
               for text, level, finish in [(plain, 0, "stop"), (plain, 0, "stop"), (technical, 0, "stop"),
                                           (technical, 4, "stop"), (plain, 4, "length"), (code, 4, "stop"),
                                           (code, 2, "stop")]]
    assert grade_spread(samples) == {0: round(fk_grade(plain), 1), 4: round(fk_grade(technical), 1)}


def test_bootstrap_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="engine"):
        load_config(BootstrapConfig, None, ["data=x.jsonl", "data_format=oasst", "engine=tgi"])
    with pytest.raises(ConfigError, match="temperatures"):
        load_config(BootstrapConfig, None, ["data=x.jsonl", "data_format=oasst", "temperatures=[-1]"])


def test_bootstrap_writes_model_and_human_rows(bootstrap_run: Path) -> None:
    rows = [json.loads(line) for line in (bootstrap_run / "samples.jsonl").read_text().splitlines()]
    model_rows = [r for r in rows if r["source"] == "model"]
    human = [r for r in rows if r["source"] == "human"]
    assert len({r["prompt"] for r in model_rows}) == 3
    assert len(human) == 9  # three replies per prompt in the fixture
    assert all(r["response"] and r["finish_reason"] in ("stop", "length") for r in model_rows)
    metrics = read_manifest(bootstrap_run)["metrics"]
    assert metrics["prompts"] == 3 and metrics["model_samples"] == len(model_rows)
    assert set(metrics["mean_chars_by_instructed_level"]["verbosity"]) <= {"0", "1", "2", "3", "4"}
    grades = metrics["median_fk_grade_by_instructed_complexity"]
    finished = [r for r in model_rows if r["finish_reason"] == "stop"]
    assert set(grades) == {str(r["instructed"]["complexity"]) for r in finished}
    assert all(isinstance(g, float) for g in grades.values())
    assert not (bootstrap_run / "samples.part.jsonl").exists()


def test_sampling_resumes_from_drawn_samples(tmp_path: Path, tiny_model_dir: Path) -> None:
    requests = [{"prompt": f"Count to {i}:", "temperature": t, "max_tokens": 6, "seed": i}
                for i, t in enumerate([0.0, 0.7, 0.7, 0.0])]
    out = tmp_path / "samples.part.jsonl"
    kept = {"index": 2, "text": "drawn before the crash", "finish_reason": "stop", "tokens": 4}
    out.write_text(json.dumps(kept) + "\n" + '{"index": 3, "te')  # a torn last line from the crash
    got = sample(str(tiny_model_dir), requests, out, engine="transformers")
    assert [g["index"] for g in got] == [0, 1, 2, 3]
    assert got[2] == kept  # not drawn again
    assert all(g["tokens"] <= 6 for g in got)
    with pytest.raises(ValueError, match="engine"):
        sample(str(tiny_model_dir), requests, out, engine="tgi")


def test_guided_samples_read_plainer(tmp_path: Path, tiny_model_dir: Path) -> None:
    (plain_score, plain_ends), (guided_score, guided_ends) = guided_pair("transformers", tiny_model_dir, tmp_path)
    assert guided_score <= plain_score and guided_ends > plain_ends


def test_bootstrap_guidance_rides_on_each_request(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = ["data=x.jsonl", "data_format=oasst"]
    plan = sample_plan(["p0"], load_config(BootstrapConfig, None, base))
    guided = render_requests(plan, tokenizer, load_config(BootstrapConfig, None, [*base, "reading_level_guidance=2"]))
    assert [r["reading_level"] for r in guided] == [[e["instructed"]["complexity"], 2.0] for e in plan]
    unguided = render_requests(plan, tokenizer, load_config(BootstrapConfig, None, base))
    assert all("reading_level" not in r for r in unguided)
    with pytest.raises(ConfigError, match="reading_level_guidance"):
        load_config(BootstrapConfig, None, [*base, "reading_level_guidance=-1"])


def test_measured_labels_follow_their_definitions() -> None:
    plain, expert = "The cat sat on the mat. It was warm.", (
        "Thermodynamic irreversibility characterises macroscopic processes whose microscopic "
        "constituents nevertheless obey time-symmetric dynamical equations.")
    assert complexity_level(plain) == 0 < complexity_level(expert) == 4
    assert fk_grade(expert) >= FK_GRADE_BOUNDS[-1]
    code = "```python\nprint(sorted(values))\n```"  # no prose: no grade, but a label (the depth code takes)
    assert math.isnan(fk_grade(code)) and complexity_level(code) == 4 and complexity_level("  ") == 0
    assert relative_complexity_levels([code, plain, expert, "", plain], ["p"] * 5) == [4, 2, 3, 0, 2]
    texts = ["a", "a b", "a b c", "a b c d", "a b c d e"] + ["one two three"]
    assert verbosity_levels(texts, ["p"] * 5 + ["lonely"]) == [0, 1, 2, 3, 4, 2]


def test_relative_complexity_ranks_a_reply_among_its_prompts_replies() -> None:
    # five replies to a chemistry question, every one of them hard to read, and one to a child's question
    chemistry = [
        "Oxidation transfers electrons between reacting chemical species.",
        "Oxidation transfers electrons.",
        "Electrochemical oxidation transfers electrons between reacting chemical species.",
        "Electrochemical oxidation irreversibly transfers electrons between heterogeneous reacting species.",
        "Electrochemical oxidation irreversibly transfers delocalised electrons between heterogeneous "
        "intermolecular reacting species.",
    ]
    assert all(complexity_level(text) >= 3 for text in chemistry)  # the absolute scale calls them all hard
    levels = relative_complexity_levels([*chemistry, "The cat sat on the mat."], ["chem"] * 5 + ["cat"])
    assert levels == [0, 1, 2, 3, 4, 0]  # the plainest chemistry reply is level 0; a lone reply ranks against all
    assert relative_complexity_levels(["", *chemistry[1:]], ["chem"] * 5)[0] == 0  # an empty reply ranks lowest


def test_annotate_measures_verbosity_and_complexity(tmp_path: Path, apm_run: Path, bootstrap_run: Path) -> None:
    out = run_recipe("annotate", tmp_path / "ann", [f"model={apm_run}", f"data={bootstrap_run / 'samples.jsonl'}",
                                                    "data_format=helpsteer", "measured=[verbosity, complexity]"])
    lines = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (bootstrap_run / "samples.jsonl").read_text().splitlines()]
    rows = [r for r in samples if r.get("finish_reason") != "length"]  # replies cut at the token cap are skipped
    capped = len(samples) - len(rows)
    assert rows and len(lines) == len(rows)
    assert read_manifest(out)["data"][0]["rows_skipped"] == (
        {"reply cut at the token cap (finish_reason: length)": capped} if capped else {})
    expected = verbosity_levels([r["response"] for r in rows], [r["prompt"] for r in rows])
    assert [line["attributes"]["verbosity"] for line in lines] == expected
    assert all(line["attributes"]["complexity"] == complexity_level(line["response"]) for line in lines)
    assert "verbosity" in read_manifest(out)["attributes"]
    with pytest.raises(ConfigError, match="measured"):
        run_recipe("annotate", tmp_path / "bad", [f"model={apm_run}", "data=x.jsonl", "data_format=helpsteer",
                                                 "measured=[humor]"])
    relative = run_recipe("annotate", tmp_path / "relative", [
        f"model={apm_run}", f"data={bootstrap_run / 'samples.jsonl'}", "data_format=helpsteer",
        "measured=[verbosity, complexity]", "complexity_scale=relative"])
    relative_lines = [json.loads(line) for line in (relative / "annotations.jsonl").read_text().splitlines()]
    assert [line["attributes"]["complexity"] for line in relative_lines] == relative_complexity_levels(
        [r["response"] for r in rows], [r["prompt"] for r in rows])
    assert [line["attributes"]["verbosity"] for line in relative_lines] == expected
    with pytest.raises(ConfigError, match="complexity_scale"):
        run_recipe("annotate", tmp_path / "bad", [f"model={apm_run}", "data=x.jsonl", "data_format=helpsteer",
                                                 "complexity_scale=grade"])

    # few finished replies, some of them long human ones: train on all of them
    acsft = run_recipe("acsft", tmp_path / "acsft", ["model=tiny", f"data={out / 'annotations.jsonl'}",
                                                     "data_format=helpsteer", "steering=described", *FAST,
                                                     "test_fraction=0", "max_length=1024"])
    manifest = read_manifest(acsft)
    assert manifest["steering"] == "described"


def test_described_prompt_carries_line_and_description() -> None:
    attributes = {"verbosity": 0, "complexity": 4}

    def template(messages: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    text = render_chat([{"role": "user", "content": "Why is the sky blue?"}], attributes,
                       SteeringMethod.DESCRIBED, template)
    system = text.split("</system>")[0]
    assert ATTRIBUTE_TURN in system and "verbosity:0" in system and "complexity:4" in system
    assert steering_instruction(attributes) in system


def test_extra_sources_mix_and_split_on_their_own(tmp_path: Path, tiny_model_dir: Path, mcq_file: Path) -> None:
    from steerserve.training import runner
    from steerserve.training.data.mcq import load_mcq_rows
    from steerserve.training.sft import SFTRecipeConfig

    other = tmp_path / "more.jsonl"
    other.write_text("".join(json.dumps({"question": f"Which letter is number {i}?", "choices": ["a", "b", "c"],
                                         "answer": i % 3}) + "\n" for i in range(20)))
    settings = [f"model={tiny_model_dir}", f"data={mcq_file}", "data_format=mcq", f"extra_data=[mcq:{other}@12]"]
    config = load_config(SFTRecipeConfig, None, settings)

    def load(data: str, data_format: str) -> tuple[list, object]:
        return load_mcq_rows(data, data_format, "train", 0)

    mixed_train, mixed_test, entries = runner.load_and_split(config, load)
    alone = load_config(SFTRecipeConfig, None, [f"data={other}", "data_format=mcq", "limit=12"])
    _, alone_test, _ = runner.load_and_split(alone, load)
    assert len(entries) == 2 and alone_test and all(row in mixed_test for row in alone_test)
    assert len(mixed_train) + len(mixed_test) == 12 + 12  # mcq_file has 12 rows; the extra is cut to 12

    out = run_recipe("sft", tmp_path / "sft", [*settings, *FAST])
    manifest = read_manifest(out)
    split = manifest["split"]
    assert len(manifest["data"]) == 2 and split["train_rows"] + split["test_rows"] + split["dropped_overlong"] == 24
