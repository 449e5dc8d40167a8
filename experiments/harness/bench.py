"""Shared helpers of the benchmarks (experiments/bench/) and the tasks' reports: machine
description, timing, markdown tables, and pausing other jobs on a shared machine while timing."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import statistics
import subprocess
import time

import jax


def machine_description() -> str:
    """CPU model (from /proc/cpuinfo), cores and library versions, for the results header."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import flax
    import optax

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"- CPU: {model}, {os.cpu_count()} cores visible to the process "
            f"(load average at start: {load:.1f})\n"
            f"- jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
            f"flax {flax.__version__}, optax {optax.__version__}, Python {platform.python_version()}")


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of `fn()` over `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def paused(pattern: str):
    """Stop the processes matching `pattern` (`pgrep -f`, never this one or its parent) for the
    duration of the block, and resume them afterwards whatever happens."""
    if not pattern:
        yield
        return
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False).stdout.split()
    pids = [int(p) for p in found if int(p) not in (os.getpid(), os.getppid())]
    stopped = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
