"""Writing small files so that a reader sees the old file or the whole new one, never a part.

One helper for every file whose half-written state would be taken for real: checkpoint markers,
`latest`, metadata, the tokenizer sidecar, a rewritten metrics file. A full disk surfaces as a
`UserError` naming the folder, and leaves no temp file behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from llmtrain.errors import UserError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (the directory entry, not just the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, durable: bool = True) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`.

    `durable=False` skips the fsyncs, for files that are cheap to lose but must never be torn
    (a rewritten metrics log).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{path.parent}: no space left on device while writing {path.name}") from None
        raise
