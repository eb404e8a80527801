"""File integrity for twin checkpoints: digests of tensors and text, the non-finite check, and
atomic writes that leave nothing behind.

Digests are sha256 (hex) of a tensor's bytes as they lie in memory, which for a CPU tensor on a
little-endian machine are the bytes a .safetensors file stores. sha256 rather than a faster CRC:
with SHA extensions it hashes at about 1.8 GB/s on one core (crc32 4.2, blake2b 0.9, md5 0.75;
bench/checkpoint_io.py), it leaves no practical chance of a damaged tensor matching, and anyone
can check it with standard tools.
"""

import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: no flock; writes stay atomic, stale temporaries are not removed
    fcntl = None

DIGEST_ALGORITHM = "sha256"
# How many fresh temporary directories a writer tries when concurrent cleanups keep taking them
# (each save cleans once, so this bounds the races, it is not a timeout).
_TEMP_ATTEMPTS = 100


def tensor_digest(t: Tensor) -> str:
    """sha256 (hex) of a CPU tensor's bytes in row-major order; a contiguous tensor is hashed in
    place, through a uint8 view of its memory (no copy)."""
    return hashlib.sha256(t.detach().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def text_digest(text: str) -> str:
    """sha256 (hex) of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- errors -------------------------------------------------------------------------------------

def os_error(code: Optional[int], message: str) -> OSError:
    """The OSError subclass the OS raises for errno `code` (FileNotFoundError for ENOENT, ...),
    with `code` as its errno and `message` as its whole text."""
    err = type(OSError(code, ""))(message) if code is not None else OSError(message)
    err.errno = code
    return err


def _in_the_way(directory: str) -> str:
    """The nearest existing one of `directory` and its ancestors: after ENOTDIR, the file that
    stands where a directory should."""
    p = directory
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def check_readable(path: str, fn: str) -> None:
    """Raises the OSError subclass and errno of what stops `path` from being read as a file,
    with a message "<fn>: <path>: <problem>"; ValueError for something that is not a regular
    file (a FIFO, a device)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            problem = "no such file"
        elif e.errno == errno.ENOTDIR:
            problem = f"{_in_the_way(os.path.dirname(os.path.abspath(path)))!r} is not a directory"
        else:
            problem = f"cannot be reached: {e.strerror or e}"
        raise os_error(e.errno, f"{fn}: {path!r}: {problem}") from e
    if stat.S_ISDIR(st.st_mode):
        raise os_error(errno.EISDIR, f"{fn}: {path!r}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{fn}: {path!r}: is not a regular file")
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:
        raise os_error(e.errno, f"{fn}: {path!r}: is not readable: {e.strerror or e}") from e


def _directory_error(e: OSError, directory: str, fn: str, path: str) -> OSError:
    if e.errno == errno.ENOENT:
        problem = f"directory {directory!r} does not exist"
    elif e.errno == errno.ENOTDIR:
        problem = f"{_in_the_way(directory)!r} is not a directory"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        problem = f"directory {directory!r} is not writable: {e.strerror}"
    else:
        problem = f"cannot create a temporary directory in {directory!r}: {e.strerror or e}"
    return os_error(e.errno, f"{fn}: {path!r}: {problem}")


# --- atomic writes ------------------------------------------------------------------------------
#
# A save to dir/name works in a private directory dir/.name.<16 hex>.tmpdir/ (mode 0700), which it
# holds an exclusive flock on from creation to removal: it writes dir/.name.<hex>.tmpdir/name
# there (the writer may use temporary files of its own inside), fsyncs it, renames it onto
# dir/name (os.replace: readers see the old file or the new one, never a part), fsyncs dir, and
# removes the directory. A save killed on the way leaves only such a directory; the next save to
# the same path removes those whose lock it can take without waiting (their writer is dead).

def _temp_pattern(name: str) -> "re.Pattern[str]":
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmpdir")


def _same_inode(path: str, fd: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _remove_temp_dir(tmp: str, fd: Optional[int]) -> None:
    """Removes a temporary directory and what is in it (files, and the directories of
    `publish_directory`), then releases its lock (closes fd). Best effort: what cannot be removed
    stays for the next save's cleanup."""
    try:
        for entry in os.listdir(tmp if fd is None else fd):
            try:
                inner = os.path.join(tmp, entry)
                if stat.S_ISDIR(os.lstat(inner).st_mode):
                    shutil.rmtree(inner, ignore_errors=True)
                elif fd is None:
                    os.unlink(inner)
                else:
                    os.unlink(entry, dir_fd=fd)
            except OSError:
                pass
        os.rmdir(tmp)
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)


def remove_stale_temps(directory: str, name: str) -> None:
    """Removes the temporary directories of saves to directory/name whose writer is dead (their
    lock is free), checking that each name still refers to the directory locked. A directory
    whose lock is held (a save in progress), or that cannot be locked at all (no flock on this
    file system, or no fcntl), is left alone."""
    if fcntl is None:
        return
    pattern = _temp_pattern(name)
    try:
        entries = [e for e in os.listdir(directory) if pattern.fullmatch(e)]
    except OSError:
        return  # the write reports what is wrong with the directory
    for entry in entries:
        tmp = os.path.join(directory, entry)
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, or not a directory of ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if _same_inode(tmp, fd):
            _remove_temp_dir(tmp, fd)
        else:
            os.close(fd)


def _make_temp_dir(directory: str, name: str) -> Tuple[str, Optional[int]]:
    """A new temporary directory for a save to directory/name and a descriptor holding its
    exclusive lock (None without fcntl). Raises os.mkdir's OSError."""
    for _ in range(_TEMP_ATTEMPTS):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmpdir")
        os.mkdir(tmp, 0o700)
        if fcntl is None:
            return tmp, None
        # Until it is locked, a concurrent save may take it for a dead save's and remove it:
        # then start again under a new name.
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue  # a concurrent cleanup removed it
        except OSError:
            _remove_temp_dir(tmp, None)  # out of descriptors, say: not a race, report it
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a concurrent cleanup holds it, and will remove it
            os.close(fd)
            continue
        except OSError:
            pass  # no flock on this file system: no cleanup can lock it either
        if _same_inode(tmp, fd):
            return tmp, fd
        os.close(fd)
    raise os_error(errno.EAGAIN, f"{_TEMP_ATTEMPTS} temporary directories in {directory!r} were "
                                 f"removed by concurrent saves before they could be locked")


def _new_file_mode(path: str) -> int:
    """Creates an empty file at `path` as any new file is created (0o666 less the umask) and
    returns its permission bits."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


# fsync of a directory that the platform or file system does not support: the rename is still
# atomic, just not yet flushed. Any other failure (EIO, ENOSPC) is reported.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, getattr(errno, "ENOTSUP", errno.EINVAL),
                      getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def fsync_dir(directory: str) -> None:
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened, as on
    Windows, or synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _existing_mode(path: str) -> Optional[int]:
    """The permission bits of the regular file at path (not following a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def _temp_dir_for(directory: str, name: str, fn: str, path: str) -> Tuple[str, Optional[int]]:
    """A save's locked temporary directory beside `path`, dead saves' temporaries removed
    first; a failure is reported as "<fn>: <path>: ..." (`_directory_error`)."""
    remove_stale_temps(directory, name)
    try:
        return _make_temp_dir(directory, name)
    except OSError as e:
        raise _directory_error(e, directory, fn, path) from e


def write_atomically(path: str, write: Callable[[str], None], fn: str) -> None:
    """Makes `path` the file that write(tmp) writes at `tmp`, atomically (protocol above). It
    keeps the permission bits of the regular file it replaces (a private file stays private),
    and a new file gets those of any new file (0o666 less the umask), whatever mode `write`
    gives it. The path itself is replaced: a symlink there becomes a regular file, and the
    owner is the saving user.

    Raises OSError subclasses keeping the errno, with messages "<fn>: <path>: <problem>" (the
    directory missing, not a directory or not writable; writing failed); whatever else `write`
    raises passes through. Either way the temporary directory is removed.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp, fd = _temp_dir_for(directory, name, fn, path)
    try:
        try:
            target = os.path.join(tmp, name)
            mode = _new_file_mode(target)
            kept = _existing_mode(path)
            write(target)
            out = os.open(target, os.O_RDWR)
            try:
                os.chmod(out if os.chmod in os.supports_fd else target,
                         mode if kept is None else kept)
                os.fsync(out)
            finally:
                os.close(out)
            os.replace(target, path)
        except OSError as e:
            raise os_error(e.errno, f"{fn}: {path!r}: writing failed: {e.strerror or e}") from e
        try:
            fsync_dir(directory)
        except OSError as e:
            raise os_error(e.errno, f"{fn}: {path!r}: written, but syncing its directory "
                                    f"failed, so the rename may not survive a crash: "
                                    f"{e.strerror or e}") from e
    finally:
        _remove_temp_dir(tmp, fd)


def publish_directory(path: str, write: Callable[[str], None], complete: str, fn: str) -> bool:
    """Makes `path` the directory that write(tmp) fills, atomically, by the protocol above: the
    directory is written under a temporary name beside `path`, every file in it fsynced, then
    renamed onto `path`. Readers see no directory or a whole one, never a part; a writer killed
    on the way leaves a temporary that the next publish to `path` removes.

    `complete` names the file whose presence marks a whole directory at `path`: a whole one
    found there when this one is written (another process published first) is kept and this one
    dropped (returns False); a directory there without it (an older, unsynced writer's) is
    replaced. Returns True when this call published. Raises OSError subclasses "<fn>: <path>: ..." as write_atomically does.
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp, fd = _temp_dir_for(directory, name, fn, path)
    try:
        target = os.path.join(tmp, name)
        os.mkdir(target)  # 0o777 less the umask, as any new directory
        write(target)
        try:
            for d, _, files in os.walk(target):
                for f in files:
                    out = os.open(os.path.join(d, f), os.O_RDONLY)
                    try:
                        os.fsync(out)
                    finally:
                        os.close(out)
                fsync_dir(d)
            if os.path.isfile(os.path.join(path, complete)):
                return False
            if os.path.lexists(path):
                os.rename(path, os.path.join(tmp, ".incomplete"))
            os.rename(target, path)
            fsync_dir(directory)
        except OSError as e:
            if os.path.isfile(os.path.join(path, complete)):
                return False  # a concurrent publisher won the rename
            raise os_error(e.errno, f"{fn}: {path!r}: publishing failed: "
                                    f"{e.strerror or e}") from e
        return True
    finally:
        _remove_temp_dir(tmp, fd)
