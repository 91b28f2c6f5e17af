"""Staged directories: the target is replaced whole when the block finishes, and left alone when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from steerserve.staging import staged_directory


def test_a_finished_block_replaces_the_target_and_a_failed_one_leaves_it(tmp_path: Path) -> None:
    target = tmp_path / "out" / "adapter"
    with staged_directory(target) as work:
        assert work.parent == target.parent and not target.exists()  # nothing visible while it is written
        (work / "weights").write_text("first")
    assert (target / "weights").read_text() == "first" and target.stat().st_mode & 0o777 == 0o755

    with pytest.raises(RuntimeError, match="interrupted"):
        with staged_directory(target) as work:
            (work / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "first"

    with staged_directory(target) as work:
        (work / "other").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["other"]  # replaced, not merged into
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]  # no work directories left behind
