"""Training outputs are served by the real server: it reads each manifest's steering and renders,
for the same messages and attributes, exactly the prompt the model was trained on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from steerserve.prompts import SteeringMethod
from steerserve.training import runner
from steerserve.training.acsft import conditioned_example
from steerserve.training.data import load_rows
from steerserve.training.data.attribute_rows import levels
from steerserve.training.dpo import pair_example

pytest.importorskip("steerserve.server.app", reason="the server is not in this checkout")
live_server = pytest.importorskip("live_server")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(sft_run: Path, dpo_run: Path, acsft_run: Path):
    with live_server.serve_models({"sft": sft_run, "dpo": dpo_run, "acsft": acsft_run}, "transformers") as live:
        yield live


def post(live, path: str, body: dict) -> dict:
    response = httpx.post(live.url + path, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_server_takes_steering_from_the_manifests(served) -> None:
    cards = {card["id"]: card for card in httpx.get(served.url + "/v1/models", timeout=30).json()["data"]}
    assert {name: card["steering"] for name, card in cards.items()} == {
        "sft:bf16": "instructions", "dpo:bf16": "instructions", "acsft:bf16": "steerlm"}


def test_acsft_prompt_served_equals_prompt_trained(served, annotate_run: Path, acsft_run: Path) -> None:
    tokenizer = runner.load_tokenizer(str(acsft_run))
    row = load_rows("attributes", str(annotate_run / "annotations.jsonl"), "helpsteer")[0][0]
    trained = conditioned_example(row, SteeringMethod.STEERLM, tokenizer)["prompt"]
    body = {"model": "acsft:bf16", "messages": [{"role": "user", "content": row["prompt"]}],
            "attributes": levels(row)}
    assert post(served, "/v1/render", body)["prompt"] == trained
    reply = post(served, "/v1/chat/completions", {**body, "max_tokens": 4, "temperature": 0})
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_dpo_prompt_served_equals_prompt_trained(served, dpo_run: Path, attribute_file: Path) -> None:
    tokenizer = runner.load_tokenizer(str(dpo_run))
    pair = load_rows("preferences", str(attribute_file), "helpsteer")[0][0]
    trained = pair_example(pair, SteeringMethod.INSTRUCTIONS, tokenizer)["prompt"]
    assert post(served, "/v1/render", {"model": "dpo:bf16", "messages": pair["prompt"]})["prompt"] == trained


def test_sft_mcq_model_answers_mcq_requests(served, mcq_file: Path) -> None:
    row = json.loads(mcq_file.read_text().splitlines()[0])
    result = post(served, "/v1/mcq", {"model": "sft:bf16", "question": row["question"], "choices": row["choices"]})
    assert math.isclose(sum(result["probabilities"].values()), 1.0, abs_tol=1e-5)
