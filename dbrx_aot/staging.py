"""Writing a directory atomically: build it in a staging directory beside the target, rename it
into place at the end. Used by export and random-checkpoint.

A staging directory is named ``.NAME.partial-PID-XXXX``; one whose process is gone (killed with
``kill -9``, a crash, a power cut) is removed by the next write of the same target, which says so.
Directories are created with the user's umask, like any other tool's output, so a serving user
other than the exporter can read the result.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("dbrx_aot")


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(out: Path) -> Path:
    """A fresh staging directory beside ``out``, after removing those abandoned by dead processes."""
    remove_abandoned(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700
    return tmp


def remove_abandoned(out: Path) -> list[Path]:
    """Remove ``.NAME.partial-PID-*`` and ``.NAME.old-PID`` directories whose process is gone."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial-(\d+)-.*|old-(\d+))")
    removed = []
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        pid = int(match.group(1) or match.group(2))
        if pid_alive(pid):
            log.warning("%s: another process (pid %d) is writing %s; left alone", path, pid, out)
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s (%.1f MB), left by an interrupted write of %s (pid %d is gone)",
                    path, size / 1e6, out, pid)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an existing one (--force) is removed only then."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)
