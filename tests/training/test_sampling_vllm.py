"""Bootstrap sampling through vLLM: a killed run leaves no engine processes behind (they once decoded
for an hour as orphans, on the cores the rerun needed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

RUN = """
import json, sys
from pathlib import Path
from steerserve.training.sampling import sample
requests = [{"prompt": f"Story {i}:", "temperature": 1.0, "max_tokens": 400, "seed": i} for i in range(400)]
sample(sys.argv[1], requests, Path(sys.argv[2]), engine="vllm")
"""


def _descendants(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_killing_the_training_process_stops_its_vllm_engine(tmp_path: Path, tiny_model_dir: Path) -> None:
    out, log = tmp_path / "samples.part.jsonl", tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        run = subprocess.Popen([sys.executable, "-c", RUN, str(tiny_model_dir), str(out)],
                               stdout=subprocess.DEVNULL, stderr=stderr)
    parent = psutil.Process(run.pid)
    spawned: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not out.exists():  # the engine is up and decoding once the first sample is written
            assert run.poll() is None, "sampling ended before it could be interrupted"
            assert time.monotonic() < deadline, "vLLM sampling did not start"
            time.sleep(1)
        spawned = _descendants(parent)  # the sampling child, vLLM's engine core and its worker
        assert len(spawned) >= 3, "no vLLM engine process under the sampling run"
        # What `pkill -f` does to a run: SIGTERM to the training process and to its sampling child, which the
        # parent's death signals again (PR_SET_PDEATHSIG); here the second one comes while vLLM shuts down.
        sampler = parent.children()[0]
        for proc in (parent, sampler):
            proc.send_signal(signal.SIGTERM)
        run.wait()
        time.sleep(1)
        if sampler.is_running():
            sampler.send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs(spawned, timeout=90)
        assert not alive, f"vLLM processes outlived the killed run: {[p.pid for p in alive]}"
        assert "Exception ignored" not in log.read_text(), "vLLM's shutdown was cut short"
        drawn = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
        assert drawn and all(0 <= row["index"] < 400 for row in drawn)  # what was drawn stays for the resume
    finally:
        for proc in [*spawned, *_descendants(parent), parent]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def test_guided_vllm_samples_read_plainer(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The bootstrap's reading-level guidance through the server's reading-level processor inside vLLM."""
    from training_helpers import guided_pair

    (plain_score, plain_ends), (guided_score, guided_ends) = guided_pair("vllm", tiny_model_dir, tmp_path)
    assert guided_score <= plain_score and guided_ends > plain_ends
