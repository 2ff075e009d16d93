"""Who holds a local folder's lock: qdrant-client local mode allows one process per folder.

When a second process opens the folder, qdrant-client only says it is "already accessed";
naming the holder (a running gateway, another ``histoxplain`` command) tells the user what to
stop. Linux lists every ``flock`` in ``/proc/locks`` with the holder's pid and the inode of
the locked file; elsewhere, or without permission, the answer is simply unknown.

The holder is named by pid and program name (``/proc/<pid>/comm``), not its command line: a
command line such as ``histoxplain index /pacs/PATIENT=...`` would put its arguments into an
error message.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["lock_holder"]


def lock_holder(lock_file: Path) -> str | None:
    """Best effort (Linux): 'pid N (program)' of the process holding a flock on lock_file."""
    try:
        inode = lock_file.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                pid = fields[4]
                program = Path(f"/proc/{pid}/comm").read_text(errors="replace").strip()
                return f"pid {pid} ({program[:32]})"
    except OSError:
        return None
    return None
