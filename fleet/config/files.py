"""Writing files so that a reader never sees half of one and nobody else can swap it.

``write_atomic`` creates the new content under a fresh name (``mkstemp``: exclusive, mode 0600) in
the target's own directory, flushes it to disk, sets the mode the file should have and renames it
over the target: a crash leaves the old file or the new one, never a truncated mix, and a symlink
or file someone planted under the temporary name is never followed. Standard library only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (UTF-8 for text) in one rename; ``OSError`` when it cannot."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(partial, mode)
        os.replace(partial, path)
    except BaseException:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise
