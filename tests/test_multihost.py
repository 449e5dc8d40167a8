"""Two JAX processes (jax.distributed, CPU gloo collectives) train SVFT over one global mesh.

Each process is a subprocess with its own XLA_FLAGS (2 local CPU devices) and a coordinator
on 127.0.0.1:<free port>. They must agree with each other exactly-ish and with a
single-process run of the same steps (the reference), within float32 round-off.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import _multihost_worker as worker
import jax
import numpy as np

from svft_jax import distributed

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(num_processes, local_devices, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    outputs = [tmp_path / f"process_{i}.json" for i in range(num_processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), str(i), str(num_processes), str(port), str(local_devices), str(out)],
            env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, out in enumerate(outputs)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:  # never leave a process waiting on a dead peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n" + "\n".join(logs)[-4000:]
    return [json.loads(out.read_text()) for out in outputs]


def test_two_processes_train_like_one(tmp_path):
    results = launch(num_processes=2, local_devices=2, tmp_path=tmp_path)
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["device_count"] == 4 for r in results)

    # Single-process reference: the same steps on one device, the whole batch at once.
    ref_losses, ref_trainable = worker.train(distributed.make_mesh(1, devices=jax.devices()[:1]), 0, 1)
    assert ref_losses[-1] < ref_losses[0]
    first, second = results
    np.testing.assert_allclose(first["losses"], second["losses"], rtol=1e-6)
    np.testing.assert_allclose(first["losses"], ref_losses, rtol=1e-5)
    assert set(first["trainable"]) == set(ref_trainable) == {"['head']['kernel']", "['layer1']['kernel'].m", "['layer2']['kernel'].m"}
    diff_between = max(float(np.max(np.abs(np.subtract(first["trainable"][p], second["trainable"][p])))) for p in ref_trainable)
    diff_reference = max(float(np.max(np.abs(np.subtract(first["trainable"][p], ref_trainable[p])))) for p in ref_trainable)
    print(f"2 processes: max |ΔM| between them {diff_between:.1e}, vs 1 process {diff_reference:.1e}; losses {first['losses']} vs {ref_losses}")
    for path, ref in ref_trainable.items():
        np.testing.assert_allclose(first["trainable"][path], second["trainable"][path], atol=1e-7)
        np.testing.assert_allclose(first["trainable"][path], ref, atol=1e-5)
