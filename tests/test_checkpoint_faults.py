"""Faults a twin file must survive: saves SIGKILLed at any point, concurrent saves, file-system
errors that need another process to arrange (no privilege, read-only, full), and every
single-byte corruption of a file.

The kills come from a fork server, this file run as a script: it imports torch and loads the
twin once, then forks a child per save and SIGKILLs it after a delay, or when the child reports
that it reached a phase of the save (the child patches the step after which it stops).
"""

import errno
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from twinmerge_ext import LowRankDelta, TwinCheckpoint
from twinmerge_ext import _files, _twin_file, checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and flock (POSIX)")

REPO = Path(__file__).resolve().parents[1]
NAME = "twin.safetensors"
TEMP_DIR = re.compile(rf"\.{re.escape(NAME)}\.[0-9a-f]{{16}}\.tmpdir")
LIBRARY_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")     # safetensors' own, inside TEMP_DIR
TASKS = ["a", "b", "c"]


def synthetic_twin(seed, m=1024, n=1_000_000):
    """A twin of about 4·(m² + 4n) bytes, built directly (no SVD): a matrix with rank-4 factors
    per task, a dense vector, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    shared = {"w": torch.randn(m, m, generator=g), "v": torch.randn(n, generator=g),
              "ids": torch.arange(7) + seed}
    r = 4
    lowrank = {"w": LowRankDelta(torch.randn(m, 3 * r, generator=g), torch.rand(3 * r, generator=g),
                                 torch.randn(m, 3 * r, generator=g), (r,) * 3)}
    dense = {"v": torch.randn(3, n, generator=g)}
    info = {"format_version": checkpoint.FORMAT_VERSION, "library_version": "0.1.0",
            "shared": {"method": "task_arithmetic", "kwargs": {"scale": 0.3}},
            "compression": {"rank": r, "rank_ratio": 0.1, "lora_exact_rank": False,
                            "oversample": 10, "n_iter": 2, "seed": seed, "include": None,
                            "exclude": None, "unchanged": []},
            "heads": None, "router": None}
    return TwinCheckpoint(TASKS, shared, lowrank, dense, {"w": [0.1, 0.2, 0.3]}, info)


def variant(twin, i):
    """twin with its vector and seed changed by i: distinct tensors and metadata per writer."""
    meta = twin.metadata
    info = {k: v for k, v in meta.items() if k not in ("tasks", "tensors")}
    info["compression"]["seed"] = 100 + i
    shared = dict(twin.shared, v=twin.shared["v"] + i)
    return TwinCheckpoint(twin.tasks, shared, twin.lowrank, twin.dense,
                          {"w": meta["tensors"]["lowrank"]["w"]["errors"]}, info)


def identical(a, b):
    """Every tensor bit for bit, and the metadata."""
    def tensors(t):
        out = {f"shared/{k}": v for k, v in t.shared.items()}
        for k, lr in t.lowrank.items():
            out.update({f"{k}/U": lr.U_cat, f"{k}/S": lr.S_cat, f"{k}/V": lr.V_cat})
        out.update({f"dense/{k}": v for k, v in t.dense.items()})
        return out
    ta, tb = tensors(a), tensors(b)
    return (a.metadata == b.metadata and ta.keys() == tb.keys()
            and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta))


def load_strictly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a file of ours has checksums: no warning
        return TwinCheckpoint.load(path)


def python_command(*args):
    return [sys.executable, str(Path(__file__).resolve()), *args]


def child_env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


# --- the fork server ----------------------------------------------------------------------------

class Server:
    """The parent's side of the server: one JSON line out, one JSON line back."""

    def __init__(self, src, path):
        self.proc = subprocess.Popen(python_command("serve", str(src), str(path)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=child_env())
        assert self.call(None) == {"ready": True}

    def call(self, request, timeout=60):
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the fork server did not answer {request} in {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit status {self.proc.wait()})"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    old, new = synthetic_twin(1), synthetic_twin(2)
    src = tmp_path_factory.mktemp("src") / "new.safetensors"
    new.save(src)
    return old, new, src


@pytest.fixture(scope="module")
def server(twins, tmp_path_factory):
    _, _, src = twins
    out = tmp_path_factory.mktemp("out")
    s = Server(src, out / NAME)
    yield s, out
    s.close()


def leftovers(out):
    """The temporary directories in `out` -> what they hold, checked to be ours and to hold
    only what a save puts there (its file, safetensors' temporary)."""
    left = {e: sorted(os.listdir(out / e)) for e in os.listdir(out) if e != NAME}
    for entry, inside in left.items():
        assert TEMP_DIR.fullmatch(entry), f"unrecognisable leftover {entry!r}"
        assert all(x == NAME or LIBRARY_TEMP.fullmatch(x) for x in inside), (entry, inside)
    return left


def check_and_reset(out, old, new, expect=None):
    """After a kill: the file is the old twin or the new one exactly, with a new file's mode,
    and whatever the kill left is ours; then the next save (of the old twin, for the next kill)
    removes it. Returns which twin the kill left and the leftovers."""
    path = out / NAME
    left = leftovers(out)
    loaded = load_strictly(path)
    which = "old" if identical(loaded, old) else "new" if identical(loaded, new) else None
    assert which is not None, "the file is neither the old twin nor the new one"
    if expect is not None:
        assert which == expect
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    old.save(path)
    assert os.listdir(out) == [NAME], "the next save left temporaries behind"
    return which, left


def test_saves_killed_at_any_time_leave_the_old_or_the_new_twin(twins, server):
    # Delays spread from 0 to past the save's measured duration: kills before, during and after
    # each step (the phases below hit each step for sure).
    old, new, _ = twins
    s, out = server
    duration = s.call({"op": "time", "runs": 3})["seconds"]
    old.save(out / NAME)
    n = 30
    for i in range(n):
        reply = s.call({"op": "kill_after", "delay": 1.1 * duration * i / (n - 1)})
        assert "killed" in reply, reply
        check_and_reset(out, old, new)


PHASES = {  # the step after which the child stops: the twin at the path, files in the leftover
    "cleaning": ("old", 1),         # removing a dead save's directory: one file of two gone
    "created": ("old", 0),          # its temporary directory made, not yet locked
    "locked": ("old", 0),
    "written": ("old", 1),          # safetensors has written the file (mode still 0600)
    "before_rename": ("old", 1),    # chmod and fsync done
    "renamed": ("new", 0),          # os.replace done, the directory not yet removed
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_saves_killed_in_each_phase(twins, server, phase):
    old, new, _ = twins
    s, out = server
    old.save(out / NAME)
    if phase == "cleaning":
        dead = out / ".twin.safetensors.00000000000000aa.tmpdir"
        dead.mkdir()
        (dead / NAME).write_bytes(b"half")
        (dead / ".tmpAbc123").write_bytes(b"half")
    assert s.call({"op": "kill_at", "phase": phase}) == {"killed": True}
    twin, files = PHASES[phase]
    _, left = check_and_reset(out, old, new, expect=twin)
    assert [len(inside) for inside in left.values()] == [files]
    if phase == "cleaning":
        assert list(left) == [dead.name]


def test_concurrent_saves_leave_one_whole_file_and_nothing_else(twins, server):
    _, new, _ = twins
    s, out = server
    writers, rounds = 4, 3
    reply = s.call({"op": "concurrent", "writers": writers, "rounds": rounds}, timeout=120)
    assert reply == {"status": [0] * writers}
    assert os.listdir(out) == [NAME]
    loaded = load_strictly(out / NAME)
    assert sum(identical(loaded, variant(new, i)) for i in range(writers)) == 1


# --- file-system errors that need another process -----------------------------------------------

def run_child(prefix, *args):
    proc = subprocess.run(prefix + python_command(*args), capture_output=True, text=True,
                          env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _works(prefix):
    """Whether a command prefix (setpriv ..., unshare ...) runs here at all."""
    try:
        return subprocess.run(prefix + ["true"], capture_output=True).returncode == 0
    except OSError:
        return False


def _error(e):
    return {"type": type(e).__name__, "errno": e.errno, "message": str(e)}


def test_permission_errors_name_the_path(tmp_path):
    # Root ignores permission bits: its child runs without the capabilities that let it.
    prefix = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        if not _works(prefix):
            pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here")
    twin = synthetic_twin(3, m=8, n=16)
    twin.save(tmp_path / "src.safetensors")
    for sub in ("ro", "closed"):
        (tmp_path / sub).mkdir()
        twin.save(tmp_path / sub / NAME)
    twin.save(tmp_path / "secret.safetensors")
    before = (tmp_path / "ro" / NAME).read_bytes()
    (tmp_path / "ro").chmod(0o555)
    (tmp_path / "closed").chmod(0)
    (tmp_path / "secret.safetensors").chmod(0)
    try:
        got = run_child(prefix, "privilege", str(tmp_path))
    finally:
        (tmp_path / "ro").chmod(0o755)
        (tmp_path / "closed").chmod(0o755)
    ro, closed = str(tmp_path / "ro"), str(tmp_path / "closed" / NAME)
    secret = str(tmp_path / "secret.safetensors")
    assert got["save"] == {"type": "PermissionError", "errno": errno.EACCES,
                           "message": f"TwinCheckpoint.save: {ro + '/' + NAME!r}: directory "
                                      f"{ro!r} is not writable: Permission denied"}
    assert got["load_secret"] == {"type": "PermissionError", "errno": errno.EACCES,
                                  "message": f"TwinCheckpoint.load: {secret!r}: is not readable: "
                                             f"Permission denied"}
    assert got["load_closed"] == {"type": "PermissionError", "errno": errno.EACCES,
                                  "message": f"TwinCheckpoint.load: {closed!r}: cannot be "
                                             f"reached: Permission denied"}
    assert os.listdir(ro) == [NAME] and (tmp_path / "ro" / NAME).read_bytes() == before


def privilege(d):
    d = Path(d)
    twin = TwinCheckpoint.load(d / "src.safetensors")
    got = {}
    for key, call in (("save", lambda: twin.save(d / "ro" / NAME)),
                      ("load_secret", lambda: TwinCheckpoint.load(d / "secret.safetensors")),
                      ("load_closed", lambda: TwinCheckpoint.load(d / "closed" / NAME))):
        try:
            call()
            got[key] = None
        except OSError as e:
            got[key] = _error(e)
    print(json.dumps(got))


def test_read_only_and_full_file_systems(twins, tmp_path):
    # A tmpfs of 1 MiB, full by the save, and one remounted read-only, in a private mount
    # namespace that ends with the child.
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0 or not shutil.which("mount") or not _works(prefix):
        pytest.skip("needs root, mount, and unshare for a private mount namespace")
    _, _, big = twins
    synthetic_twin(3, m=8, n=16).save(tmp_path / "small.safetensors")
    for sub in ("full", "ro"):
        (tmp_path / sub).mkdir()
    got = run_child(prefix, "mounts", str(tmp_path), str(big))
    if "skip" in got:
        pytest.skip(got["skip"])
    full, ro = str(tmp_path / "full"), str(tmp_path / "ro")
    assert got["full"] == {"type": "OSError", "errno": errno.ENOSPC,
                           "message": f"TwinCheckpoint.save: {full + '/' + NAME!r}: writing "
                                      f"failed: No space left on device",
                           "listing": [NAME], "intact": True}
    assert got["ro"] == {"type": "OSError", "errno": errno.EROFS,
                         "message": f"TwinCheckpoint.save: {ro + '/' + NAME!r}: directory "
                                    f"{ro!r} is not writable: Read-only file system",
                         "listing": [NAME], "intact": True}


def mounts(d, big):
    d = Path(d)
    small, big = TwinCheckpoint.load(d / "small.safetensors"), TwinCheckpoint.load(big)
    for sub in ("full", "ro"):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d / sub)],
                           capture_output=True, text=True)
        if r.returncode:
            print(json.dumps({"skip": f"cannot mount a tmpfs: {r.stderr.strip()}"}))
            return
        small.save(d / sub / NAME)
    subprocess.run(["mount", "-o", "remount,ro", str(d / "ro")], check=True)
    got = {}
    for sub, twin in (("full", big), ("ro", small)):
        path = d / sub / NAME
        before = path.read_bytes()
        try:
            twin.save(path)
            got[sub] = {}
        except OSError as e:
            got[sub] = _error(e)
        got[sub].update(listing=sorted(os.listdir(d / sub)), intact=path.read_bytes() == before)
    print(json.dumps(got))


# --- corruption ---------------------------------------------------------------------------------

def test_every_single_bit_flip_is_caught(tmp_path):
    # Bit 0 of every byte of a small twin file, header and data: a digit stays a digit, a hex
    # digit mostly stays one. Each flipped file must be rejected with a ValueError; the one
    # flip that may load is in the name of the checksums key, which makes the file look older
    # than checksums: it then warns, and holds the exact twin (nothing else changed).
    twin = synthetic_twin(4, m=4, n=6)
    bad = tmp_path / "twin.safetensors"
    twin.save(bad)
    raw = bad.read_bytes()
    no_checksums = (f"TwinCheckpoint.load: {str(bad)!r} has no checksums (written before they "
                    f"were added): its contents could not be verified; save it again to add them")
    rejected, warned = 0, []
    with open(bad, "r+b") as f:  # flipped and restored in place (a rewrite is much slower)
        for i in range(len(raw)):
            f.seek(i)
            f.write(bytes([raw[i] ^ 1]))
            f.flush()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    loaded = TwinCheckpoint.load(bad)
                except ValueError:
                    rejected += 1
                else:   # compared before the byte is restored (the tensors may map the file)
                    assert [str(w.message) for w in caught] == [no_checksums], i
                    assert identical(loaded, twin), i
                    warned.append(i)
                    del loaded
            f.seek(i)
            f.write(raw[i:i + 1])
            f.flush()
    assert bad.read_bytes() == raw
    key = raw.index(b'"twinmerge.checksums"')
    assert all(key < i < key + len('"twinmerge.checksums"') for i in warned)
    assert rejected + len(warned) == len(raw)


def serve(src, path):
    """The fork server's loop (runs in its own process)."""
    torch.set_num_threads(1)   # no OpenMP pool in the server: forked children stay sound
    twin = TwinCheckpoint.load(src)

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "time":
            times = []
            for _ in range(req["runs"]):
                t0 = time.perf_counter()
                pid = _fork_save(twin, path)
                os.waitpid(pid, 0)
                times.append(time.perf_counter() - t0)
            reply({"seconds": min(times)})
        elif req["op"] == "kill_after":
            pid = _fork_save(twin, path)
            time.sleep(req["delay"])
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
                reply({"error": f"the save failed with status {os.WEXITSTATUS(status)}"})
            else:
                reply({"killed": os.WIFSIGNALED(status)})
        elif req["op"] == "kill_at":
            r, w = os.pipe()
            pid = _fork_save(twin, path, phase=req["phase"], signal_fd=w)
            os.close(w)
            reached = select.select([r], [], [], 30)[0] and os.read(r, 1) == b"p"
            os.close(r)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            reply({"killed": bool(reached) and os.WIFSIGNALED(status)})
        elif req["op"] == "concurrent":
            pids = [_fork_save(variant(twin, i), path, rounds=req["rounds"])
                    for i in range(req["writers"])]
            reply({"status": [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]})


def _fork_save(twin, path, phase=None, signal_fd=None, rounds=1):
    pid = os.fork()
    if pid:
        return pid
    try:
        if phase is not None:
            _stop_after(phase, signal_fd)
        for _ in range(rounds):
            twin.save(path)
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def _stop_after(phase, fd):
    """Patches the save's step `phase` (in this child only) to report on fd and wait for the
    SIGKILL once the step is done."""
    def stop():
        os.write(fd, b"p")
        time.sleep(600)
        os._exit(2)

    def after(fn):
        return lambda *a, **k: (fn(*a, **k), stop())

    if phase == "cleaning":
        os.unlink = after(os.unlink)
    elif phase == "created":
        os.mkdir = after(os.mkdir)
    elif phase == "locked":
        _files._make_temp_dir = after(_files._make_temp_dir)
    elif phase == "written":
        _twin_file.save_file = after(_twin_file.save_file)
    elif phase == "before_rename":
        os.replace = lambda *a, **k: stop()
    elif phase == "renamed":
        os.replace = after(os.replace)


if __name__ == "__main__":
    {"serve": serve, "privilege": privilege, "mounts": mounts}[sys.argv[1]](*sys.argv[2:])
