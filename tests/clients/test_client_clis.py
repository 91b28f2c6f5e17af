"""``steerserve chat`` driven through a pipe, and ``steerserve mcq`` on one question and on a JSONL file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from steerserve.clients.mcq_cli import main as mcq_main

CHAT = "tiny:bf16"


def test_chat_repl_changes_sliders_mid_conversation(tiny_server) -> None:
    script = "Hello there\n/verbosity 1\n/complexity 0\n/attributes\nAnd again?\n/verbosity 9\n/reset\n/quit\nnever sent\n"
    done = subprocess.run(
        [sys.executable, "-m", "steerserve.cli", "chat", "--url", tiny_server.url, "--model", CHAT,
         "--max-tokens", "4", "--temperature", "0", "--repetition-penalty", "1.3"],
        input=script, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    applied = [line for line in done.stdout.splitlines() if line.startswith("[attributes ")]
    assert len(applied) == 2  # "never sent" after /quit is not
    assert "complexity:4,verbosity:4" in applied[0] and "complexity:0,verbosity:1" in applied[1]
    assert "sliders: " in done.stdout and "(verbosity = 1)" in done.stdout
    assert "error: attribute 'verbosity' must be an integer from 0 to 4" in done.stdout
    assert "(conversation cleared)" in done.stdout


def test_mcq_single_question(tiny_server, capsys) -> None:
    assert mcq_main(["--url", tiny_server.url, "--model", CHAT, "Which is a colour?",
                     "--choice", "red", "--choice", "seven"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0][:2] in ("A)", "B)") and "  A: " in out


def test_mcq_file_accuracy(tiny_server, tmp_path: Path, capsys) -> None:
    rows = [{"question": f"Pick option {i}?", "choices": ["x", "y", "z"], "answer": i % 3} for i in range(7)]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "result.json"
    assert mcq_main(["--url", tiny_server.url, "--model", CHAT, "--file", str(data), "--batch-size", "3",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["total"] == 7 and len(result["predictions"]) == 7
    assert result["accuracy"] == sum(p == r["answer"] for p, r in zip(result["predictions"], rows)) / 7
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(("flag", "value"), [("repetition-penalty", "20"), ("loop-guard", "1")])
def test_chat_sends_the_repetition_penalty_and_loop_guard(tiny_server, flag: str, value: str) -> None:
    """The flags reach the server: one out of its range comes back as the server's error naming the field."""
    done = subprocess.run(
        [sys.executable, "-m", "steerserve.cli", "chat", "--url", tiny_server.url, "--model", CHAT,
         "--max-tokens", "4", f"--{flag}", value],
        input="Hello there\n/quit\n", capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "error:" in done.stdout and flag.replace("-", "_") in done.stdout, done.stdout
