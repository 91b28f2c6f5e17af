"""Data loaders: the three row shapes from real formats, masked labels, grouped split, bad-data errors."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from steerserve.attributes import ATTRIBUTE_NAMES
from steerserve.training.data import DataError, grouped_split, load_rows, prompt_key
from steerserve.training.data.attribute_rows import load_attribute_rows
from steerserve.training.data.preferences import pairs_from_attribute_rows, slider_pairs_from_attribute_rows
from steerserve.training.data.io import LoadReport

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repo")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def helpsteer_rows() -> list[dict]:
    """HelpSteer's shape: ints 0-4; one row leaves verbosity unlabelled."""
    base = {"correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 2}
    return [
        {"prompt": "What is 2+2?", "response": "4.", "helpfulness": 4, **base},
        {"prompt": "What is 2+2?", "response": "Maybe 5.", "helpfulness": 1, **base},
        {"prompt": "What is 2+2?", "response": "Four.", "helpfulness": 4, **base},
        {"prompt": "Name a colour.", "response": "Blue.", "helpfulness": 3, **{**base, "verbosity": None}},
        {"prompt": "Name a colour.", "response": "", "helpfulness": 3, **base},
    ]


# ---- attribute rows ---------------------------------------------------------


def test_helpsteer_rows_keep_labels_and_mask_missing(tmp_path: Path) -> None:
    rows, report = load_rows("attributes", str(write_jsonl(tmp_path / "hs.jsonl", helpsteer_rows())), "helpsteer")
    assert len(rows) == 4 and report.skipped == {"empty prompt or response": 1}
    assert rows[0]["helpfulness"] == 4.0 and rows[0]["quality"] is None  # HelpSteer has no quality: masked
    assert rows[3]["verbosity"] is None and rows[3]["coherence"] == 4.0  # missing, not zero


def test_helpsteer_reads_csv_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = helpsteer_rows()[:4]
    with open(tmp_path / "hs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "hs.parquet")
    from_csv, _ = load_rows("attributes", str(tmp_path / "hs.csv"), "helpsteer")
    from_parquet, _ = load_rows("attributes", str(tmp_path / "hs.parquet"), "helpsteer")
    assert from_csv == from_parquet and from_csv[3]["verbosity"] is None


@needs_shared
def test_oasst_labels_rescaled_to_0_4() -> None:
    rows, report = load_rows("attributes", str(SHARED / "oasst1/oasst1_en_validation.jsonl"), "oasst")
    assert len(rows) > 1000 and report.skipped["deleted message"] > 0
    values = [row[name] for row in rows for name in ("quality", "humor", "helpfulness") if row[name] is not None]
    assert min(values) >= 0 and max(values) == 4.0  # fractions 0-1 times 4
    assert all(row["correctness"] is None and row["verbosity"] is None for row in rows)  # oasst lacks them


def test_annotated_rows_parse_the_attribute_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "p", "response": "r", "attribute_line": "helpfulness:2,verbosity:0"},
        {"prompt": "q", "response": "s", "attributes": {"humor": 3}},
    ])
    rows, _ = load_rows("attributes", str(path), "helpsteer")
    assert rows[0]["helpfulness"] == 2 and rows[0]["verbosity"] == 0 and rows[0]["quality"] is None
    assert rows[1]["humor"] == 3 and set(rows[1]) == {"prompt", "response", *ATTRIBUTE_NAMES}


def test_replies_cut_at_the_token_cap_are_skipped(tmp_path: Path) -> None:
    """Bootstrap samples carry the engine's finish reason; a reply cut mid-loop is no reply to condition on."""
    path = write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": "p", "response": "Done.", "finish_reason": "stop"},
        {"prompt": "p", "response": "1. A\n2. A\n3. A\n4. ", "finish_reason": "length"},
        {"prompt": "p", "response": "A human reply.", "finish_reason": None},
    ])
    rows, report = load_attribute_rows(str(path), "helpsteer", require_labels=False)
    assert [row["response"] for row in rows] == ["Done.", "A human reply."]
    assert report.skipped == {"reply cut at the token cap (finish_reason: length)": 1}


# ---- preference pairs -------------------------------------------------------


def test_pairs_from_attribute_rows_pick_more_helpful_and_drop_ties(tmp_path: Path) -> None:
    rows, _ = load_rows("attributes", str(write_jsonl(tmp_path / "hs.jsonl", helpsteer_rows())), "helpsteer")
    report = LoadReport(source="hs")
    pairs = pairs_from_attribute_rows(rows, report)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("4.", "Maybe 5."), ("Four.", "Maybe 5.")]
    assert report.skipped == {"tie in helpfulness": 1, "only one labelled reply to its prompt": 1}


def test_slider_pairs_condition_on_the_chosen_replys_own_labels(tmp_path: Path) -> None:
    """Two replies 2+ levels apart on verbosity or complexity: two pairs, each reply chosen under its own line."""
    rows = [
        {"prompt": "Why is the sky blue?", "response": "Scattering.", "verbosity": 0, "complexity": 1, "humor": 0},
        {"prompt": "Why is the sky blue?", "response": "Sunlight scatters off air molecules; blue scatters most, "
                                                       "so the sky looks blue.", "verbosity": 3, "complexity": 2},
        {"prompt": "Why is the sky blue?", "response": "Rayleigh.", "verbosity": 1, "complexity": 1},
        {"prompt": "Name a colour.", "response": "Blue.", "verbosity": 0, "complexity": 0},
        {"prompt": "Name a colour.", "response": "Blue.", "verbosity": 4, "complexity": 0},
    ]
    loaded, _ = load_rows("attributes", str(write_jsonl(tmp_path / "hs.jsonl", rows)), "helpsteer")
    report = LoadReport(source="hs")
    pairs = slider_pairs_from_attribute_rows(loaded, report)
    assert [(p["chosen"], p["rejected"], p["attributes"]["verbosity"], p["contrast"]) for p in pairs] == [
        ("Scattering.", rows[1]["response"], 0, ["verbosity"]),
        (rows[1]["response"], "Scattering.", 3, ["verbosity"]),
        (rows[1]["response"], "Rayleigh.", 3, ["verbosity"]),
        ("Rayleigh.", rows[1]["response"], 1, ["verbosity"]),
    ]
    assert pairs[0]["attributes"] == {"verbosity": 0, "complexity": 1, "humor": 0}
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert report.skipped == {"no slider 2 levels apart from an earlier reply to its prompt": 1,
                              "chosen and rejected are identical": 1}
    by_format, _ = load_rows("preferences", str(tmp_path / "hs.jsonl"), "helpsteer-sliders")
    assert by_format == pairs


def test_hh_transcripts_become_messages(tmp_path: Path) -> None:
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me\n\nAssistant: Sure.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me\n\nAssistant: No.",
    }
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps(record) + "\n" + json.dumps({**record, "rejected": record["chosen"]}) + "\n")
    pairs, report = load_rows("preferences", str(path), "hh-rlhf")
    assert pairs == [{
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Help me"}],
        "chosen": "Sure.", "rejected": "No.",
    }]
    assert report.skipped == {"chosen and rejected are identical": 1}


def test_plain_pairs_accept_text_and_conversational(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hey"}],
         "rejected": [{"role": "assistant", "content": "No"}]},
    ])
    pairs, _ = load_rows("preferences", str(path), "pairs")
    assert [p["chosen"] for p in pairs] == ["Hello", "Hey"] and pairs[1]["prompt"][0]["content"] == "Hi"


@needs_shared
def test_hh_rlhf_shared_file_loads() -> None:
    pairs, report = load_rows("preferences", str(SHARED / "hh-rlhf/harmless-base_test.jsonl.gz"), "hh-rlhf")
    assert len(pairs) + sum(report.skipped.values()) == 2312 and len(pairs) > 2200


# ---- MCQ --------------------------------------------------------------------


def test_sciq_truthfulqa_and_generic_mcq(tmp_path: Path) -> None:
    sciq = write_jsonl(tmp_path / "sciq.jsonl", [{
        "question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
        "distractor3": "neon", "correct_answer": "carbon dioxide", "support": "Photosynthesis uses CO2.",
    }])
    rows, _ = load_rows("mcq", str(sciq), "sciq")
    assert rows[0]["choices"][rows[0]["answer"]] == "carbon dioxide" and rows[0]["explanation"]
    assert rows == load_rows("mcq", str(sciq), "sciq")[0]  # the shuffle is deterministic
    truthful = write_jsonl(tmp_path / "tqa.jsonl", [
        {"question": "Q?", "mc1_targets": {"choices": ["right", "w1", "w2"], "labels": [1, 0, 0]}},
        {"question": "Many?", "mc1_targets": {"choices": [f"c{i}" for i in range(13)], "labels": [1] + [0] * 12}},
    ])
    rows, report = load_rows("mcq", str(truthful), "truthfulqa")
    assert len(rows) == 1 and rows[0]["choices"][rows[0]["answer"]] == "right"
    assert sum(report.skipped.values()) == 1  # 13 choices: counted, not silently dropped
    generic = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "choices": ["a", "b"], "answer": "B",
                                                 "context": "ctx"}])
    assert load_rows("mcq", str(generic), "mcq")[0][0]["answer"] == 1


@needs_shared
def test_aqua_and_mmlu_shared_files() -> None:
    aqua, _ = load_rows("mcq", str(SHARED / "aqua/dev.json"), "aqua")
    assert len(aqua) == 254 and aqua[0]["choices"][0] == "32400" and aqua[0]["explanation"]
    mmlu, _ = load_rows("mcq", str(SHARED / "mmlu/dev"), "mmlu")
    assert len(mmlu) == 285 and all(len(row["choices"]) == 4 for row in mmlu)


# ---- split ------------------------------------------------------------------


def test_grouped_split_never_leaks_a_prompt_and_is_deterministic() -> None:
    rows = [{"prompt": f"prompt {i % 17}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(200)]
    train, test = grouped_split(rows, prompt_key, test_fraction=0.2, seed=3)
    assert len(train) + len(test) == 200 and test
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in test}
    again = grouped_split(list(reversed(rows)), prompt_key, test_fraction=0.2, seed=3)[1]
    assert {prompt_key(r) for r in again} == {prompt_key(r) for r in test}  # order does not matter
    other = grouped_split(rows, prompt_key, test_fraction=0.2, seed=4)[1]
    assert {prompt_key(r) for r in other} != {prompt_key(r) for r in test}


# ---- bad data: each names file, row and field --------------------------------


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "helpfulness": 1}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
        load_rows("attributes", str(path), "helpsteer")


def test_missing_field_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl line 1: field 'rejected': missing"):
        load_rows("preferences", str(path), "pairs")


def test_label_out_of_range_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "hs.jsonl", [{"prompt": "p", "response": "r", "helpfulness": 7}])
    with pytest.raises(DataError, match=r"line 1: field 'helpfulness': label 7.0 is outside 0-4"):
        load_rows("attributes", str(path), "helpsteer")


def test_bad_attribute_line_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r", "attribute_line": "funny:9"}])
    with pytest.raises(DataError, match=r"line 1: field 'attributes.funny': unknown attribute"):
        load_rows("attributes", str(path), "helpsteer")


def test_bad_csv_answer_names_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "mmlu.csv"
    path.write_text("question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,1\nQ2,a,b,c,d,seven\n")
    with pytest.raises(DataError, match=r"mmlu\.csv row 2: field 'answer': expected an answer index"):
        load_rows("mcq", str(path), "mmlu")


def test_answer_out_of_range_and_bad_aqua_option(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(DataError, match=r"field 'answer': index 5 but only 2 choices"):
        load_rows("mcq", str(path), "mcq")
    aqua = write_jsonl(tmp_path / "aqua.json", [{"question": "Q", "options": ["A)1", "C)2"], "correct": "A"}])
    with pytest.raises(DataError, match=r"aqua\.json row 1: field 'options': option 2"):
        load_rows("mcq", str(aqua), "aqua")


def test_hh_text_that_is_not_a_transcript(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "just text", "rejected": "more text"}])
    with pytest.raises(DataError, match=r"field 'chosen': not an HH-RLHF transcript"):
        load_rows("preferences", str(path), "hh-rlhf")


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no .* files"):
        load_rows("mcq", str(tmp_path), "mcq")
    with pytest.raises(ValueError, match="unknown MCQ format 'sciqq'"):
        load_rows("mcq", str(tmp_path), "sciqq")


def test_oasst_sibling_ranks_make_pairs_with_the_whole_conversation(tmp_path: Path) -> None:
    tree = [
        {"message_id": "p1", "parent_id": None, "role": "prompter", "text": "Name a planet."},
        {"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "Mars.", "rank": 0},
        {"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "The Moon.", "rank": 2},
        {"message_id": "a3", "parent_id": "p1", "role": "assistant", "text": "Venus.", "rank": 1},
        {"message_id": "a4", "parent_id": "p1", "role": "assistant", "text": "Pluto?", "rank": None},
        {"message_id": "p2", "parent_id": "a1", "role": "prompter", "text": "Another one?"},
        {"message_id": "b1", "parent_id": "p2", "role": "assistant", "text": "Jupiter.", "rank": 0},
        {"message_id": "b2", "parent_id": "p2", "role": "assistant", "text": "Jupiter.", "rank": 1},
    ]
    pairs, report = load_rows("preferences", str(write_jsonl(tmp_path / "tree.jsonl", tree)), "oasst-ranks")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Mars.", "Venus."), ("Mars.", "The Moon."),
                                                             ("Venus.", "The Moon.")]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Name a planet."}]
    assert report.skipped == {"no sibling rank": 1, "chosen and rejected are identical": 1}


@needs_shared
def test_oasst_ranks_on_the_real_tree() -> None:
    pairs, report = load_rows("preferences", str(SHARED / "oasst1/oasst1_en_validation.jsonl"), "oasst-ranks")
    assert len(pairs) > 900 and any(len(p["prompt"]) > 1 for p in pairs)  # follow-ups keep their context
