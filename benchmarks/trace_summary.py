"""Where a GPU program's time goes, from a `jax.profiler.trace` directory, as one JSON dict.

Reads the newest `*.trace.json.gz` the profiler wrote, keeps the kernel events of the first
GPU's streams, and sums their time by kind (matrix products, collectives, the fused |grad|
kernel, copies, everything else: XLA's elementwise and reduction fusions). It also reports
how much collective time is exposed (no compute kernel running on the device meanwhile) and
how much of the traced window the device computes at all, so a step's gap to the matmul
ceiling splits into: idle device, exposed communication, non-matmul kernels, and matmuls
running below the measured rate.

  python benchmarks/trace_summary.py /tmp/trace_dir [steps]
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import sys

# Substrings (of lowercase kernel names) in the order they are tried.
KINDS = (
    ("collective", ("nccl", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "collective")),
    ("abs_kernel", ("harmjax_abs_grad_sum",)),
    ("copy", ("memcpy", "memset")),
    ("attention", ("fmha", "flash", "cudnn")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "wgmma", "sm90_", "sm80_", "dot", "matmul")),
)


def kind_of(name: str) -> str:
    """The kind of a kernel from its name (see KINDS); "other" for XLA's remaining fusions."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _union(intervals):
    """Merged, sorted (start, end) intervals."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def _overlap(a, b) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, e - s)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def load_events(log_dir: str | pathlib.Path) -> tuple[list[dict], dict, dict]:
    """(complete events, pid -> process name, (pid, tid) -> thread name) of the newest trace."""
    files = sorted(pathlib.Path(log_dir).glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"No *.trace.json.gz under {log_dir}/plugins/profile: did jax.profiler.trace run there?")
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [e for e in events if e.get("ph") == "X"], procs, threads


def summarize(log_dir: str | pathlib.Path, steps: int = 1, top: int = 12) -> dict:
    """Per-step milliseconds by kernel kind on the first GPU, exposed collective time, device
    idle time, and the `top` kernels by total time (see the module docstring)."""
    events, procs, threads = load_events(log_dir)
    gpus = sorted(p for p, n in procs.items() if "gpu" in n.lower() and "/device:" in n.lower())
    if not gpus:
        return {"error": f"no GPU process in the trace (processes: {sorted(set(procs.values()))})"}
    pid = gpus[0]
    # Kernel streams only: the device's "XLA Ops" / "XLA Modules" / "Steps" lines repeat the
    # same time at coarser grain.
    names = {t: n for (p, t), n in threads.items() if p == pid}
    stream_tids = {t for t, n in names.items() if n.lower().startswith("stream")}
    if not stream_tids:
        derived = ("xla ops", "xla modules", "steps", "tensorflow", "framework", "source")
        stream_tids = {t for t, n in names.items() if not n.lower().startswith(derived)}
    kernels = [e for e in events if e["pid"] == pid and e.get("tid") in stream_tids and e.get("dur", 0) > 0]
    if not kernels:
        return {"error": "no kernel events on the first GPU's streams",
                "threads": sorted(names.values())}
    by_kind = collections.defaultdict(float)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    spans = collections.defaultdict(list)
    for e in kernels:
        kind = kind_of(e["name"])
        by_kind[kind] += e["dur"]
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
        spans["collective" if kind == "collective" else "compute"].append((e["ts"], e["ts"] + e["dur"]))
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    compute, comm = _union(spans["compute"]), _union(spans["collective"])
    busy = _union(spans["compute"] + spans["collective"])
    per_step = 1e-3 / steps  # microseconds in the trace -> ms per step
    return {
        "device": procs[pid], "steps": steps, "kernels": len(kernels),
        "window_ms": round((end - start) * per_step, 3),
        "busy_ms": round(_length(busy) * per_step, 3),
        "compute_busy_ms": round(_length(compute) * per_step, 3),
        "collective_exposed_ms": round((_length(comm) - _overlap(comm, compute)) * per_step, 3),
        "kernel_ms_by_kind": {k: round(v * per_step, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms": round(t * per_step, 3), "calls_per_step": round(c / steps, 2)}
                        for n, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
        "streams": sorted(names[t] for t in stream_tids),
    }


if __name__ == "__main__":
    print(json.dumps(summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1), indent=1))
