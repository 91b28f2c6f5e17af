"""Each recipe trains a few steps on a tiny random model: parameters change, losses are finite,
the manifest is complete, the output loads back; DPO losses differ by type; the APM predicts one
value per attribute; annotate + acsft round-trip through the attribute codec."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_helpers import FAST, run_recipe, write_jsonl
from safetensors.torch import load_file

from steerserve.attributes import format_attributes, parse_attributes
from steerserve.prompts import ATTRIBUTE_TURN, MCQ_ANSWER_PREFIX, SteeringMethod, render_mcq_question
from steerserve.training import dpo, runner
from steerserve.training.apm import load_apm, masked_mse, predict
from steerserve.training.config import ConfigError
from steerserve.training.data import load_rows
from steerserve.training.manifest import is_complete, read_manifest
from steerserve.training.output import RunDir
from steerserve.training.sft import mcq_example

pytestmark = pytest.mark.slow


def weights_changed(base: Path, trained: Path) -> float:
    """Largest absolute change over the tensors both checkpoints hold."""
    before, after = load_file(base / "model.safetensors"), load_file(trained / "model.safetensors")
    shared = set(before) & set(after)
    assert shared, "no common tensors"
    return max(float((after[k].float() - before[k].float()).abs().max()) for k in shared)


def finite_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "logs/train_log.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert losses and all(math.isfinite(loss) for loss in losses)
    return losses


def check_servable(run: Path, steering: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(run)
    assert not is_complete(manifest) and manifest["steering"] == steering and manifest["servable"] is True
    assert manifest["data"][0]["files"][0]["sha256"] and manifest["steps"] == 3
    model, tokenizer = AutoModelForCausalLM.from_pretrained(run), AutoTokenizer.from_pretrained(run)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] >= ids.shape[1] + 1


# ---- sft ---------------------------------------------------------------------


def test_sft_trains_and_saves_servable_checkpoint(sft_run: Path, tiny_model_dir: Path) -> None:
    assert weights_changed(tiny_model_dir, sft_run) > 1e-6
    finite_losses(sft_run)
    check_servable(sft_run, "instructions")
    metrics = read_manifest(sft_run)["metrics"]
    assert math.isfinite(metrics["eval_loss"]) and metrics["mcq_scored"] > 0 and 0 <= metrics["mcq_accuracy"] <= 1


def test_mcq_target_continues_the_servers_mcq_prompt(tiny_model_dir: Path) -> None:
    """Training text = server prompt (which ends in 'Answer:') + the scored ' B' token + rationale."""
    tokenizer = runner.load_tokenizer(str(tiny_model_dir))
    row = {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "explanation": "Two and two make four."}
    example = mcq_example(row, SteeringMethod.INSTRUCTIONS, tokenizer)
    question = render_mcq_question("2+2?", ["3", "4"])
    served = runner.chat_prompt([{"role": "user", "content": question}], None, SteeringMethod.INSTRUCTIONS,
                                tokenizer, MCQ_ANSWER_PREFIX)
    full = example["prompt"] + example["completion"]
    assert full.startswith(served + " B\nExplanation: Two and two make four.")
    assert example["completion"].endswith(tokenizer.eos_token)


def test_sft_chat_rows_with_lora_save_adapter_and_merged_model(tmp_path: Path, tiny_raw_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i} it is."}]}
        for i in range(8)
    ])
    settings = [f"model={tiny_raw_model_dir}", f"data={data}", "data_format=messages", *FAST[:-1], "lora=true",
                "lora_r=4"]
    out = run_recipe("sft", tmp_path / "sft-lora", settings)
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "config.json").exists()
    assert weights_changed(tiny_raw_model_dir, out) > 1e-6  # the merged model differs from the base
    check_servable(out, "steerlm")


# ---- dpo ---------------------------------------------------------------------


def test_dpo_trains_and_reports_held_out_rewards(dpo_run: Path, tiny_model_dir: Path) -> None:
    assert weights_changed(tiny_model_dir, dpo_run) > 1e-6
    finite_losses(dpo_run)
    check_servable(dpo_run, "instructions")
    manifest = read_manifest(dpo_run)
    assert manifest["hyperparameters"]["loss_type"] == "robust"
    assert 0 <= manifest["metrics"]["heldout_reward_accuracy"] <= 1
    assert math.isfinite(manifest["metrics"]["heldout_reward_margin"])


def test_dpo_loss_types_differ_on_the_same_batch(tmp_path: Path, tiny_model_dir: Path, attribute_file: Path) -> None:
    """With the policy moved off the reference, sigmoid, robust (flip rate 0.1) and IPO disagree, and so does
    sigmoid with an NLL term on the chosen reply (sft_weight) or with the length weighting of LD-DPO (ld_alpha)."""
    pairs, _ = load_rows("preferences", str(attribute_file), "helpsteer")
    tokenizer = runner.load_tokenizer(str(tiny_model_dir))
    examples = [dpo.pair_example(p, SteeringMethod.INSTRUCTIONS, tokenizer) for p in pairs[:4]]
    losses = {}
    for name, loss_type, smoothing, extra in (("sigmoid", "sigmoid", 0.0, {}), ("robust", "robust", 0.1, {}),
                                              ("ipo", "ipo", 0.0, {}), ("rpo", "sigmoid", 0.0, {"sft_weight": 1.0}),
                                              ("ld", "sigmoid", 0.0, {"ld_alpha": 0.0})):
        config = dpo.DPORecipeConfig(model=str(tiny_model_dir), data=str(attribute_file), data_format="helpsteer",
                                     loss_type=loss_type, label_smoothing=smoothing, batch_size=4, max_steps=1,
                                     **extra)
        run_dir = RunDir(tmp_path / name, {"recipe": "dpo"})
        run_dir.prepare()
        trainer = dpo.build_trainer(config, run_dir, str(tiny_model_dir), tokenizer, examples, [])
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in trainer.model.parameters():  # the same shift in every trainer's policy
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses[name] = float(trainer.compute_loss(trainer.model, batch))
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses["sigmoid"] - losses["robust"]) > 1e-4 and abs(losses["sigmoid"] - losses["ipo"]) > 1e-4
    assert losses["rpo"] > losses["sigmoid"] + 1.0  # plus the chosen replies' mean NLL: several nats on a random model
    assert abs(losses["sigmoid"] - losses["ld"]) > 1e-4


def test_whole_replies_trains_only_on_pairs_whose_replies_both_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A pair is dropped when either reply (end of turn included) runs past max_length, counted as TRL tokenizes
    it; the run records how many it dropped and still trains."""
    rows = [{"prompt": f"Question {i}: tell me about {i}.",
             "chosen": f"About {i}." + " More about it." * (4 * i if i % 2 else 1),
             "rejected": f"Not {i}." + " Less about it." * (1 if i % 2 else 4 * i)} for i in range(12)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, _ = load_rows("preferences", str(data), "pairs")
    tokenizer = runner.load_tokenizer(str(tiny_model_dir))
    examples = [dpo.pair_example(p, SteeringMethod.INSTRUCTIONS, tokenizer) for p in pairs]
    longest = [max(len(tokenizer(ex["prompt"] + ex[side]).input_ids) for side in ("chosen", "rejected"))
               for ex in examples]
    limit = sorted(longest)[len(longest) // 2]
    kept, dropped = dpo.whole_pairs(examples, tokenizer, limit)
    assert kept == [ex for ex, n in zip(examples, longest) if n <= limit]
    assert dropped == sum(n > limit for n in longest) > 0
    cut = [ex for ex, n in zip(examples, longest) if n > limit]
    assert {len(ex["chosen"]) > len(ex["rejected"]) for ex in cut} == {True, False}  # either side's cut drops it
    with pytest.raises(ConfigError, match="whole_replies leaves no training pair"):
        dpo.whole_pairs(examples, tokenizer, min(longest) - 1)
    settings = [s for s in FAST if not s.startswith("max_length")]
    out = run_recipe("dpo", tmp_path / "whole", [f"model={tiny_model_dir}", f"data={data}", "data_format=pairs",
                                                 "whole_replies=true", f"max_length={limit}", *settings])
    split = read_manifest(out)["split"]
    assert split["dropped_cut_replies"] > 0 and split["train_pairs"] > 0
    finite_losses(out)


def test_dpo_on_slider_pairs_renders_each_pairs_own_attribute_line(tmp_path: Path, tiny_model_dir: Path,
                                                                   attribute_file: Path) -> None:
    """Attribute-conditioned DPO: the two pairs of one contrast carry different lines; a real TRL run on them."""
    pairs, _ = load_rows("preferences", str(attribute_file), "helpsteer-sliders")
    tokenizer = runner.load_tokenizer(str(tiny_model_dir))
    first, mirrored = (dpo.pair_example(p, SteeringMethod.DESCRIBED, tokenizer) for p in pairs[:2])
    assert (first["chosen"], first["rejected"]) == (mirrored["rejected"], mirrored["chosen"])
    for pair, example in ((pairs[0], first), (pairs[1], mirrored)):
        assert format_attributes(pair["attributes"]) in example["prompt"]
    assert first["prompt"] != mirrored["prompt"]
    out = run_recipe("dpo", tmp_path / "dpo-sliders", [f"model={tiny_model_dir}", f"data={attribute_file}",
                                                        "data_format=helpsteer-sliders", "steering=described",
                                                        "loss_type=robust", "label_smoothing=0.1", *FAST])
    finite_losses(out)
    check_servable(out, "described")
    assert weights_changed(tiny_model_dir, out) > 1e-6


# ---- apm ---------------------------------------------------------------------


def test_apm_predicts_one_value_per_attribute(apm_run: Path, tiny_model_dir: Path, attribute_file: Path) -> None:
    manifest = read_manifest(apm_run)
    assert not is_complete(manifest) and manifest["servable"] is False
    names = manifest["attributes"]
    assert names == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]  # what the rows label
    model, tokenizer, loaded = load_apm(str(apm_run))
    assert loaded == names and model.config.problem_type == "regression"
    rows, _ = load_rows("attributes", str(attribute_file), "helpsteer")
    predictions = predict(model, tokenizer, rows[:5], 4, 192, names, progress=False)
    assert len(predictions) == 5 and all(len(p) == len(names) and all(map(math.isfinite, p)) for p in predictions)
    finite_losses(apm_run)
    assert weights_changed(tiny_model_dir, apm_run) > 1e-6
    heldout = manifest["metrics"]["heldout"]
    assert set(heldout) <= set(names) and all(m["mae"] >= 0 for m in heldout.values())
    assert "coherence" in manifest["metrics"]["helpsteer_paper_check"]


def test_masked_mse_ignores_missing_labels() -> None:
    predictions = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    labels = torch.tensor([[1.0, float("nan")], [1.0, float("nan")]])
    assert float(masked_mse(predictions, labels)) == pytest.approx(2.0)  # (0 + 4) / 2 labelled, NaNs not zeros


# ---- annotate + acsft --------------------------------------------------------


def test_annotate_writes_codec_lines(annotate_run: Path, apm_run: Path) -> None:
    lines = [json.loads(line) for line in (annotate_run / "annotations.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and read_manifest(annotate_run)["metrics"]["rows_annotated"] == 24
    names = read_manifest(apm_run)["attributes"]
    for line in lines:
        assert set(line["attributes"]) == set(names)
        assert parse_attributes(line["attribute_line"]) == {**parse_attributes(format_attributes({})),
                                                            **line["attributes"]}


def test_annotate_resumes_after_interruption(tmp_path: Path, apm_run: Path, attribute_file: Path,
                                             annotate_run: Path) -> None:
    settings = [f"model={apm_run}", f"data={attribute_file}", "data_format=helpsteer", "batch_size=5"]

    def crash(done: int) -> None:
        if done >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe("annotate", tmp_path / "ann", settings, callbacks=(crash,))
    partial = tmp_path / ".ann.partial" / "annotations.jsonl"
    assert len(partial.read_text().splitlines()) == 10 and not (tmp_path / "ann").exists()
    with partial.open("a") as handle:
        handle.write('{"prompt": "torn li')  # a crash mid-line
    out = run_recipe("annotate", tmp_path / "ann", settings)
    assert read_manifest(out)["metrics"]["resumed_at_row"] == 10
    assert (out / "annotations.jsonl").read_text() == (annotate_run / "annotations.jsonl").read_text()


def test_acsft_prompts_carry_annotated_lines_and_train(acsft_run: Path, annotate_run: Path,
                                                       tiny_raw_model_dir: Path) -> None:
    from steerserve.training.acsft import conditioned_example

    tokenizer = runner.load_tokenizer(str(tiny_raw_model_dir))
    rows, _ = load_rows("attributes", str(annotate_run / "annotations.jsonl"), "helpsteer")
    annotated = [json.loads(line) for line in (annotate_run / "annotations.jsonl").read_text().splitlines()]
    for row, line in zip(rows, annotated):
        example = conditioned_example(row, SteeringMethod.STEERLM, tokenizer)
        trained_line = example["prompt"].rsplit(ATTRIBUTE_TURN, 1)[1].strip()
        assert parse_attributes(trained_line) == parse_attributes(line["attribute_line"])
        assert example["completion"] == line["response"] + "\n<extra_id_1>"
    assert weights_changed(tiny_raw_model_dir, acsft_run) > 1e-6
    finite_losses(acsft_run)
    check_servable(acsft_run, "steerlm")


def test_acsft_chat_template_puts_line_in_system_turn(tiny_model_dir: Path) -> None:
    from steerserve.training.acsft import conditioned_example

    tokenizer = runner.load_tokenizer(str(tiny_model_dir))
    method = runner.steering_for(tokenizer, "auto", conditioned=True)
    assert method is SteeringMethod.CHAT_TEMPLATE
    row = {"prompt": "Hi", "response": "Hello.", "helpfulness": 2.6, "verbosity": 0.4, "humor": None}
    example = conditioned_example(row, method, tokenizer)
    assert f"<|im_start|>system\n{ATTRIBUTE_TURN}{format_attributes({'helpfulness': 3, 'verbosity': 0})}" \
        in example["prompt"]
    assert example["completion"] == "Hello." + tokenizer.eos_token
