"""The output directory of a run: built in a temp dir beside it, renamed into place when finished.

A crash leaves ``.<name>.partial/`` behind with its checkpoints; rerunning the same
command resumes from the last one. A finished directory (it has ``manifest.json``)
is never overwritten without ``force``::

    run_dir = RunDir(Path("runs/dpo"), fingerprint={"recipe": "dpo", ...}, force=False)
    work = run_dir.prepare()          # write checkpoints, model, logs under work
    run_dir.commit()                  # atomically becomes runs/dpo
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from steerserve.staging import write_text_atomic
from steerserve.training import distributed

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# Settings that may change between a crash and its resume without invalidating the checkpoints.
RESUME_SAFE = frozenset({"max_steps", "epochs", "logging_steps", "save_steps", "keep_checkpoints", "eval_batch_size"})


class OutputExists(RuntimeError):
    """The output directory holds a finished run (or something else) and ``force`` was not given."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file + rename (``steerserve.staging.write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _comparable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in fingerprint.get("config", {}).items() if k not in RESUME_SAFE}
    return {**fingerprint, "config": config}


class RunDir:
    """One run's output: ``final`` once committed, ``work`` (a hidden sibling) until then."""

    def __init__(self, final: Path, fingerprint: dict[str, Any], force: bool = False) -> None:
        self.final = Path(final).resolve()
        self.work = self.final.parent / f".{self.final.name}.partial"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.force = force
        self.resumed = False

    @property
    def checkpoints(self) -> Path:
        return self.work / CHECKPOINTS

    def prepare(self) -> Path:
        """Check the destination, then create or reuse the work dir; returns it.

        Under a multi-process launcher only rank 0 checks and creates; the others (run after it:
        ``runner.start`` wraps this in ``main_process_first``) just use the same work dir.
        """
        if not distributed.is_main_process():
            return self.work
        if self.final.exists() and any(self.final.iterdir()) and not self.force:
            what = "a finished run" if (self.final / MANIFEST).exists() else "files that are not a finished run"
            raise OutputExists(f"{self.final} holds {what}; pass --force to overwrite it")
        if self.work.exists():
            self._reuse_or_clear()
        self.work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.work / RUN_FILE, self.fingerprint)
        return self.work

    def _reuse_or_clear(self) -> None:
        try:
            previous = json.loads((self.work / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous is not None and _comparable(previous) == _comparable(self.fingerprint):
            self.resumed = True
            logger.info("resuming the unfinished run in %s", self.work)
            return
        if not self.force:
            raise OutputExists(
                f"{self.work} holds an unfinished run with a different recipe or config; rerun with the same "
                "settings to resume it, or pass --force to discard it"
            )
        logger.warning("discarding the unfinished run in %s (--force)", self.work)
        shutil.rmtree(self.work)

    def last_checkpoint(self) -> str | None:
        """The newest intact ``checkpoint-N`` to resume from, if any.

        A crash during a save leaves a half-written checkpoint: it is reported and skipped,
        so the run resumes from the one before instead of failing deep inside the trainer.
        """
        if not self.checkpoints.is_dir():
            return None
        found = [p for p in self.checkpoints.iterdir() if p.name.startswith("checkpoint-") and p.name[11:].isdigit()]
        for path in sorted(found, key=lambda p: int(p.name[11:]), reverse=True):
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            logger.warning("skipping damaged checkpoint %s: %s", path, problem)
        return None


    def commit(self, manifest: dict[str, Any], keep_checkpoints: bool = False) -> Path:
        """Write the manifest last, then swap the work dir into place (an old finished dir is removed after).

        Under a multi-process launcher every rank waits until all have finished writing into the work
        dir, rank 0 alone commits, and the others return once the final dir is in place.
        """
        distributed.wait_for_everyone()
        if distributed.is_main_process():
            self._commit(manifest, keep_checkpoints)
        distributed.wait_for_everyone()
        return self.final

    def _commit(self, manifest: dict[str, Any], keep_checkpoints: bool) -> None:
        if not keep_checkpoints and self.checkpoints.exists():
            shutil.rmtree(self.checkpoints)
        (self.work / RUN_FILE).unlink(missing_ok=True)
        write_json_atomic(self.work / MANIFEST, manifest)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.work, self.final)
        if old is not None:
            shutil.rmtree(old)
        logger.info("wrote %s", self.final)


def checkpoint_problem(path: Path) -> str | None:
    """Why a trainer checkpoint cannot be resumed from (None when it is intact)."""
    from safetensors import safe_open

    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        json.loads(state.read_text())
    except ValueError as exc:
        return f"trainer_state.json is not valid JSON ({exc})"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for weight in weights:
        try:
            with safe_open(str(weight), framework="pt") as handle:  # checks the header covers the whole file
                handle.keys()
        except Exception as exc:  # safetensors raises several types for a damaged file
            return f"{weight.name} is unreadable ({type(exc).__name__}: {exc})"
    return None


def complete_lines(path: Path) -> list[str]:
    """The complete lines of an append-only JSONL file; a torn last line (a crash mid-write) is cut off.

    Resumable steps (annotate, sampling) append one line per finished row and continue after these.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        path.write_bytes(data[:keep])
    return data[:keep].decode().splitlines()
