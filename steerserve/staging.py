"""Files and directories that appear whole or not at all: written beside the target under a hidden name, then
renamed.

Every writer of a finished directory (shipped and stacked adapters, merged checkpoints, the converted default
model) goes through :func:`staged_directory`, so an interrupted write never leaves a half-written directory where
a reader looks, and two writers of one target never share a work directory; files go through
:func:`write_text_atomic`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temp file + rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty work directory; when the block finishes it replaces ``target`` (readable by all, since
    whoever serves the output may not be whoever wrote it). On an exception the work directory is removed and
    ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work
        work.chmod(0o755)  # mkdtemp makes it owner-only
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
