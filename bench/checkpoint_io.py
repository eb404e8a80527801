"""Twin checkpoint I/O: the checksum candidates' throughput, and what verification costs a load.

    python -m bench.checkpoint_io --out bench/results/checkpoint-io-NAME.json [--tasks 4]
        [--threads N]

Hash rates are for one 256 MiB tensor hashed in place (a uint8 view, no copy), one thread; the
non-finite check is the one `load` runs on every floating tensor. The file is a twin of
RoBERTa-base's shapes (125M parameters, word embeddings unchanged as when frozen, every other
matrix at rank_ratio 0.1, T tasks) written by `TwinCheckpoint.save`; its load is timed with and
without verification, from the page cache (warm) and after evicting the file's pages (cold:
posix_fadvise DONTNEED, no other file is touched; on a VM the host may still cache it),
against plain `safetensors.torch.load_file`, which maps the file and checks nothing: the floor.
--threads 1 keeps torch's reductions off a thread pool whose barriers stall when other work
shares the cores (as it did for the committed results: another build ran beside them).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import ssl
import subprocess
import tempfile
import threading
import zlib
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file

import twinmerge_ext as tm
from bench.timing import measure
from twinmerge_ext import LowRankDelta, TwinCheckpoint
from twinmerge_ext._finite import non_finite

HASHES = {
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "sha1": lambda b: hashlib.sha1(b).digest(),
    "md5": lambda b: hashlib.md5(b).digest(),
    "blake2b": lambda b: hashlib.blake2b(b).digest(),
    "sha512": lambda b: hashlib.sha512(b).digest(),
    "crc32": lambda b: zlib.crc32(b),
    "adler32": lambda b: zlib.adler32(b),
}


def _rate(nbytes, timing):
    return nbytes / (timing.median_ms * 1e-3) / 1e9


def hash_rates(nbytes=256 << 20, min_run_time=1.0):
    t = torch.randn(nbytes // 4)
    buf = t.view(torch.uint8).numpy()

    def rate(fn):
        return _rate(nbytes, measure(fn, warmup=1, runs=5, min_run_time=min_run_time))

    out = {name: rate(lambda f=f: f(buf)) for name, f in HASHES.items()}

    def two_threads():  # hashlib releases the GIL: two tensors hashed at once
        half = len(buf) // 2
        th = [threading.Thread(target=hashlib.sha256, args=(buf[i * half:(i + 1) * half],))
              for i in range(2)]
        for x in th:
            x.start()
        for x in th:
            x.join()
    out["sha256_2_threads"] = rate(two_threads)
    out["non_finite_check"] = rate(lambda: non_finite(t))
    out["isfinite_all"] = rate(lambda: bool(torch.isfinite(t).all()))
    return out


def roberta_twin(T, h=768, f=3072, L=12, vocab=50265, rank_ratio=0.1, seed=0):
    """A twin of RoBERTa's parameter shapes (base by default) with random values: the bytes
    are what count."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embeddings.word_embeddings.weight": (vocab, h),
              "embeddings.position_embeddings.weight": (514, h),
              "embeddings.token_type_embeddings.weight": (1, h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for i in range(L):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            shapes[p + m + ".weight"], shapes[p + m + ".bias"] = (h, h), (h,)
        for m, shape in (("intermediate.dense", (f, h)), ("output.dense", (h, f))):
            shapes[p + m + ".weight"], shapes[p + m + ".bias"] = shape, shape[:1]
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (h,), (h,)
    shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (h, h), (h,)
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    lowrank, dense, errors, unchanged = {}, {}, {}, ["embeddings.word_embeddings.weight"]
    for name, s in shapes.items():
        if name in unchanged:
            continue
        if len(s) == 2:
            r = max(1, math.floor(rank_ratio * min(s)))
            lowrank[name] = LowRankDelta(torch.randn(s[0], T * r, generator=g),
                                         torch.rand(T * r, generator=g),
                                         torch.randn(s[1], T * r, generator=g), (r,) * T)
            errors[name] = [0.5] * T
        else:
            dense[name] = torch.randn((T,) + s, generator=g)
    info = {"format_version": 1, "library_version": tm.__version__,
            "shared": {"method": "task_arithmetic", "kwargs": {"scale": 0.3}},
            "compression": {"rank": None, "rank_ratio": rank_ratio, "lora_exact_rank": False,
                            "oversample": 10, "n_iter": 2, "seed": 0, "include": None,
                            "exclude": None, "unchanged": unchanged},
            "heads": None, "router": None}
    return TwinCheckpoint([f"task{t}" for t in range(T)], shared, lowrank, dense, errors, info)


def _evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def load_times(T, **shape):
    twin = roberta_twin(T, **shape)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        path = os.path.join(d, "twin.safetensors")
        save = measure(lambda: twin.save(path), warmup=1, runs=3, min_run_time=0.0)
        size = os.path.getsize(path)
        fns = {"load_verify": lambda: TwinCheckpoint.load(path),
               "load_no_verify": lambda: TwinCheckpoint.load(path, verify=False),
               "safetensors_load_file": lambda: load_file(path)}
        out = {"file_bytes": size, "tensors": len(twin.metadata["tensors"]["shared"]),
               "tasks": T, "save_ms": save.median_ms}
        for name, fn in fns.items():
            out[f"{name}_warm_ms"] = measure(fn, warmup=1, runs=5, min_run_time=0.0).median_ms
            out[f"{name}_cold_ms"] = measure(lambda fn=fn: (_evict(path), fn()), warmup=1,
                                             runs=5, min_run_time=0.0).median_ms
        out["evict_only_ms"] = measure(lambda: _evict(path), warmup=1, runs=5,
                                       min_run_time=0.0).median_ms
    return out


def environment():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        git = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "openssl": ssl.OPENSSL_VERSION,
            "zlib": zlib.ZLIB_RUNTIME_VERSION, "git": git,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"environment": environment(), "hash_gb_per_s": hash_rates(),
              "roberta_base_twin": load_times(args.tasks)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
