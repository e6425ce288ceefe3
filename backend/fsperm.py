"""Private files and directories: burrow's data holds secrets, whatever the umask says.

``burrow.db`` holds an ingress private key and basic-auth passwords, ``captures.db``
holds clients' Authorization headers, ``ca-key.pem`` signs every certificate.  Every
directory burrow creates for them is 0700 and every such file 0600, set explicitly
(``mkdir``/``open`` modes are masked by the umask, so a umask of 022 or 000 would widen
them otherwise).

A directory or file that already exists and is open to others is tightened, with a
warning, rather than refused as ssh does with a loose ``~/.ssh``: it is burrow's own data
and nobody else is meant to read it, so fixing it is what the user wants.  The exceptions
are refused with a one-line :class:`InsecurePathError`: a directory owned by another user
(we should not change someone else's directory) and a shared directory such as ``/tmp``
(world-writable or sticky; making it 0700 would break everyone else using it).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("burrow.fsperm")

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


class InsecurePathError(OSError):
    """A data path that is open to others and that burrow will not tighten itself."""


def private_dir(path: Path | str, *, tighten: bool = True) -> Path:
    """Create ``path`` (and missing parents) with the last component 0700.

    An existing directory is tightened to 0700 when group or others can use it, unless
    ``tighten`` is false (a directory the user chose for something else, e.g. the folder
    an ``--inspect-db`` file sits in: its file is still made 0600).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, mode=DIR_MODE)
    except FileExistsError:
        pass
    else:
        os.chmod(path, DIR_MODE)  # the mkdir mode went through the umask
        return path
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePathError(f"{path} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if not tighten or not mode & 0o077:
        return path
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise InsecurePathError(
            f"{path} is a shared directory (mode {mode:04o}); give burrow a directory of its own"
        )
    if st.st_uid != os.geteuid():
        raise InsecurePathError(
            f"{path} is open to others (mode {mode:04o}) and owned by uid {st.st_uid}, not us; "
            f"chmod 700 it or use another directory"
        )
    log.warning("%s was open to others (mode %04o); setting mode 0700", path, mode)
    os.chmod(path, DIR_MODE)
    return path


def tighten_file(path: Path | str) -> bool:
    """Make an existing file 0600 if group or others could use it; False if it is absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %04o); setting mode 0600", path, mode)
        try:
            os.chmod(path, FILE_MODE)
        except PermissionError:
            raise InsecurePathError(
                f"{path} is readable by others (mode {mode:04o}) and we may not chmod it; "
                f"chmod 600 it or use another file"
            ) from None
    return True


def private_sqlite(path: Path | str) -> None:
    """Before opening a SQLite database: create it 0600 (SQLite would use 0644 minus the
    umask, and gives its -wal/-shm files the database's mode) and tighten what exists."""
    path = Path(path)
    if not tighten_file(path):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        os.chmod(path, FILE_MODE)  # the open mode went through the umask
    sqlite_side_files(path)


def sqlite_side_files(path: Path | str) -> None:
    """Tighten a database's -wal/-shm/-journal files (after opening, or left by an old run)."""
    for suffix in SQLITE_SIDE_FILES:
        tighten_file(f"{path}{suffix}")
