"""The one timing helper of bench/: CUDA events with warm-up and an L2 flush on GPU,
torch.utils.benchmark on CPU. Every result is a Timing with the median and the spread."""

import dataclasses
import statistics
from typing import Callable, Dict

import torch
import torch.utils.benchmark as tb


@dataclasses.dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def as_dict(self):
        return dataclasses.asdict(self)


_flush_buffers = {}


def _flush_l2(device):
    # Writing a buffer twice the size of the L2 evicts whatever the timed call left there, so
    # every run reads its operands from HBM, as a merge between requests would.
    if device not in _flush_buffers:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        # A normal tensor even when first timed under inference_mode, which forbids writing an
        # inference tensor outside it (the next case's timings).
        with torch.inference_mode(False):
            _flush_buffers[device] = torch.empty(max(2 * l2, 1 << 20) // 4, dtype=torch.int32,
                                                 device=device)
    _flush_buffers[device].zero_()


def _times(fn: Callable[[], object], device: torch.device, warmup: int, runs: int,
           min_run_time: float):
    """Raw per-call times in milliseconds."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for start, end in zip(starts, ends):
            _flush_l2(device)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [t * 1e3 for t in m.blocked_autorange(min_run_time=min_run_time).times]


def _summary(times) -> Timing:
    times = sorted(times)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


def measure(fn: Callable[[], object], device="cpu", warmup: int = 5, runs: int = 50,
            min_run_time: float = 0.5) -> Timing:
    """Times fn() on `device`: median and 10th/90th percentiles in milliseconds."""
    return _summary(_times(fn, torch.device(device), warmup, runs, min_run_time))


def measure_all(fns: Dict[str, Callable[[], object]], device="cpu", rounds: int = 7,
                runs: int = 20, min_run_time: float = 0.1, warmup: int = 3) -> Dict[str, Timing]:
    """Times several implementations of one thing in interleaved rounds (a, b, c, a, b, c, ...),
    so that drift of the clock or of neighbouring load hits all of them alike; the ratios
    between them are what the benchmarks report. Each first runs at least `warmup` + 1
    untimed calls (pass fewer for calls that take seconds)."""
    device = torch.device(device)
    raw = {name: [] for name in fns}
    for name, fn in fns.items():
        _times(fn, device, warmup=warmup, runs=1, min_run_time=0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            raw[name] += _times(fn, device, 0, runs, min_run_time)
    return {name: _summary(times) for name, times in raw.items()}


def copy_bandwidth(device="cpu", nbytes: int = 256 << 20) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted), the memory floor's unit."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, runs=20, min_run_time=0.3)
    return 2 * nbytes / (t.median_ms * 1e-3)


def gemm_rate(dtype=torch.float32, device="cpu", size: int = 2048) -> float:
    """Measured dense GEMM throughput in FLOP/s for square matrices of `size`."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    t = measure(lambda: a @ b, device, runs=10, min_run_time=0.3)
    return 2 * size**3 / (t.median_ms * 1e-3)
