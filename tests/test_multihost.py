"""Several processes (jax.distributed, CPU collectives): two local processes with one device each
meta-train like one process with two devices, and only process 0 writes the run directory.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import serialization
from test_meta_train import DATA, ROOT, TINY, _flat

import learned_opt
from meta_train import checkpoint, load_run_config
from meta_train.cli import parse_args
from meta_train.tracking import read_metrics

# TINY, the config of the sharded/unsharded comparison (sharded here: the default).
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()
         if k not in ("shard", "wandb")] + ["--optimizer-arg=init_alpha=0.01", "--wandb=offline"]


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:  # older jaxlib layout
        from jax._src.lib import xla_extension as _jax
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(devices: int, *flags):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", LOPT_DATA_DIR=DATA, WANDB_SILENT="true")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    cmd = [sys.executable, "-m", "meta_train", *FLAGS, *flags]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _start_pair(*flags):
    """Processes 0 and 1 of a two-process run, one CPU device each; ``flags[i]``: process i's."""
    port = _free_port()
    return [_start(1, *flags[i], f"--coordinator=localhost:{port}", "--num-processes=2",
                   f"--process-id={i}") for i in (0, 1)]


def _wait(procs) -> list[str]:
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:  # a process whose peer died waits for it: do not leave it behind
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return logs


def _final_state(run_dir):
    meta = checkpoint.latest(run_dir)
    assert meta["step"] == 4
    return serialization.msgpack_restore((run_dir / "checkpoints" / meta["file"]).read_bytes())


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_equal_one_process_with_two_devices(tmp_path):
    one, multi, other = tmp_path / "one", tmp_path / "multi", tmp_path / "proc1"
    single = _start(2, f"--out={one}", "--outer-steps=4")
    # 2 steps, then 2 more with --resume (which reads the run directory on every process).
    # Process 1 first gets its own --out (they would share one) to show that it writes none.
    logs = _wait(_start_pair([f"--out={multi}", "--outer-steps=2"],
                             [f"--out={other}", "--outer-steps=2"]))
    assert not other.exists()
    assert "process 0 saved the optimizer" in logs[1]
    resume = [f"--out={multi}", "--outer-steps=4", "--resume"]
    logs += _wait(_start_pair(resume, resume))
    logs += _wait([single])
    for log, processes in zip(logs, (2, 2, 2, 2, 1), strict=True):  # one mesh, both processes
        assert f"devices: 2, processes: {processes})" in log, log[-3000:]

    assert load_run_config(multi).replace(out=str(one), resume=False) == load_run_config(one)
    assert list((multi / "wandb").glob("offline-run-*"))
    # Tolerances of test_meta_train.compare_runs: members to rounding, the ES mean to 1e-3.
    np.testing.assert_allclose([r["meta_loss"] for r in read_metrics(multi)],
                               [r["meta_loss"] for r in read_metrics(one)], rtol=1e-5)
    s_one, s_multi = _final_state(one), _final_state(multi)
    np.testing.assert_allclose(_flat(s_multi["inner"]), _flat(s_one["inner"]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(_flat(s_multi["es"]["mean"]), _flat(s_one["es"]["mean"]),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(_flat(learned_opt.load(multi / "optimizer")[1]),
                               _flat(learned_opt.load(one / "optimizer")[1]), rtol=1e-3,
                               atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--process-id=1"], "--process-id needs --num-processes"),
    (["--num-processes=2", "--coordinator=localhost:1234"], "needs --process-id"),
    (["--num-processes=2", "--process-id=2", "--coordinator=localhost:1234"],
     "--process-id 2 is out of range for --num-processes 2"),
    (["--num-processes=2", "--process-id=0"], "needs --coordinator HOST:PORT"),
    (["--num-processes=2", "--process-id=0", "--coordinator=host:abc"],
     "the port must be a number in 1..65535, got 'abc'"),
    (["--join-timeout=5"], "--join-timeout needs --num-processes"),
])
def test_bad_process_flags_fail_at_once(flags, message, capsys, monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as e:
        parse_args(["--task=mlp_fmnist_tiny", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_coordinator_times_out_with_its_address(capsys, monkeypatch):
    """Process 1 with nobody at the coordinator's address: a usage error naming it after the
    timeout, not a silent hang (JAX's own timeout aborts with a C++ stack trace)."""
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        parse_args(["--task=mlp_fmnist_tiny", "--num-processes=2", "--process-id=1",
                    f"--coordinator=127.0.0.1:{port}", "--join-timeout=1.5"])
    assert e.value.code == 2 and 1.5 <= time.monotonic() - t0 < 30
    assert f"process 1: no coordinator at 127.0.0.1:{port} after 1.5 s" in capsys.readouterr().err

