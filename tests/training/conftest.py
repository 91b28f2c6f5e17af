"""Fixtures for the training tests: small data files written here, and finished tiny runs shared per session.

Every run trains a few steps of a tiny random Llama (``tiny_model_dir`` / ``tiny_raw_model_dir``)
on rows these fixtures write, so the suite needs neither a hub nor ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import FAST, run_recipe, write_jsonl

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training-data")


@pytest.fixture(scope="session")
def attribute_file(data_dir: Path) -> Path:
    """HelpSteer-shaped rows: 8 prompts x 3 replies, ints 0-4, a few labels missing."""
    rows = []
    for p in range(8):
        for r in range(3):
            rows.append({
                "prompt": f"Question {p}: what is {p} plus a small number?",
                "response": f"The answer is {p + r}." + " Because numbers add up." * r,
                "helpfulness": (p + r) % 5, "correctness": (p + 2 * r) % 5, "coherence": 4 - r,
                "complexity": r, "verbosity": None if p == 3 else r + 1,
            })
    return write_jsonl(data_dir / "helpsteer.jsonl", rows)


@pytest.fixture(scope="session")
def mcq_file(data_dir: Path) -> Path:
    rows = [{"question": f"What is {i} times 2?", "choices": [str(2 * i), str(2 * i + 1), str(i), "none"],
             "answer": 0, "explanation": f"{i} doubled is {2 * i}." if i % 2 else None}
            for i in range(12)]
    return write_jsonl(data_dir / "mcq.jsonl", rows)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, mcq_file: Path) -> Path:
    """MCQ SFT (answer letter + rationale), instructions format (the tiny model has a chat template)."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    return run_recipe("sft", out, [f"model={tiny_model_dir}", f"data={mcq_file}", "data_format=mcq", *FAST])


@pytest.fixture(scope="session")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, attribute_file: Path) -> Path:
    """DPO (robust) on pairs derived from the attribute rows."""
    out = tmp_path_factory.mktemp("runs") / "dpo"
    return run_recipe("dpo", out, [f"model={tiny_model_dir}", f"data={attribute_file}", "data_format=helpsteer",
                                   "loss_type=robust", "label_smoothing=0.1", *FAST])


@pytest.fixture(scope="session")
def apm_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, attribute_file: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "apm"
    settings = [s for s in FAST if not s.startswith("lora")]
    return run_recipe("apm", out, [f"model={tiny_model_dir}", f"data={attribute_file}", "data_format=helpsteer",
                                   *settings])


@pytest.fixture(scope="session")
def annotate_run(tmp_path_factory: pytest.TempPathFactory, apm_run: Path, attribute_file: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "annotate"
    return run_recipe("annotate", out, [f"model={apm_run}", f"data={attribute_file}", "data_format=helpsteer",
                                        "batch_size=5"])


@pytest.fixture(scope="session")
def acsft_run(tmp_path_factory: pytest.TempPathFactory, tiny_raw_model_dir: Path, annotate_run: Path) -> Path:
    """acsft on annotate's output, steerlm format (the raw tiny model has no chat template)."""
    out = tmp_path_factory.mktemp("runs") / "acsft"
    return run_recipe("acsft", out, [f"model={tiny_raw_model_dir}", f"data={annotate_run / 'annotations.jsonl'}",
                                     "data_format=helpsteer", *FAST])
