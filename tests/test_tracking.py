"""Metrics tracking: every row reaches metrics.jsonl and wandb (offline) exactly once, also when a
run is killed with SIGKILL and resumed (issue 12, item 3).

wandb's rows are read back from its transaction logs (``DIR/wandb/*-ID/run-ID.wandb``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meta_train import MetaTrainConfig, checkpoint, meta_train
from meta_train.tracking import MetricsLogger, read_metrics, wandb_history, wandb_logs

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("LOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("LOPT_DATA_DIR", DATA)
os.environ.setdefault("WANDB_SILENT", "true")


def _log_steps(logger, steps):
    for t in steps:
        logger.log(t, {"meta_loss": 1.0 / (t + 1), "alpha": 0.1 + t})


def _wandb_steps(run_dir):
    run_id = (Path(run_dir) / "wandb_id.txt").read_text().strip()
    return [row["step"] for row in wandb_history(run_dir, run_id)]


def test_wandb_history_reads_back_the_logged_rows_and_stops_at_a_cut(tmp_path):
    logger = MetricsLogger(tmp_path, {"seed": 0}, "offline")
    _log_steps(logger, range(6))
    logger.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    rows = wandb_history(tmp_path, run_id)
    assert [r["step"] for r in rows] == list(range(6))
    for row, logged in zip(rows, read_metrics(tmp_path), strict=True):
        assert row["meta_loss"] == logged["meta_loss"] and row["alpha"] == logged["alpha"]

    # A log cut short (a kill during a write): the complete records before the cut are read.
    (path,) = wandb_logs(tmp_path, run_id)
    data = path.read_bytes()
    history_end = data.rfind(b"meta_loss")  # inside the last history record
    path.write_bytes(data[:history_end])
    assert [r["step"] for r in wandb_history(tmp_path, run_id)] == list(range(5))
    path.write_bytes(b"not a wandb log")
    with pytest.raises(ValueError, match=f"{path.name} is not a wandb transaction log"):
        wandb_history(tmp_path, run_id)


def _interrupted_and_resumed(run_dir, first_mode):
    """Steps 0-7 logged with wandb ``first_mode``, then a resume from step 5 logs 5-9 offline."""
    run_dir.mkdir()
    for mode, resume_step, steps in ((first_mode, None, range(8)), ("offline", 5, range(5, 10))):
        logger = MetricsLogger(run_dir, {}, mode, resume_step=resume_step)
        _log_steps(logger, steps)
        logger.close()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(10))
    return run_id, wandb_history(run_dir, run_id)


def test_a_resumed_run_sends_wandb_exactly_the_rows_it_lacks(tmp_path):
    # wandb ahead of the checkpoint (rows 5-7 written before the interruption): not sent again.
    run_id, rows = _interrupted_and_resumed(tmp_path / "ahead", "offline")
    assert [r["step"] for r in rows] == list(range(10))
    assert len(wandb_logs(tmp_path / "ahead", run_id)) == 2  # one log per segment

    # wandb behind (nothing it received was written; here: it was off): the missing rows of
    # metrics.jsonl are replayed, with their values, before the run goes on.
    run_id, rows = _interrupted_and_resumed(tmp_path / "behind", "disabled")
    assert [r["step"] for r in rows] == list(range(10))
    assert [r["meta_loss"] for r in rows] == [r["meta_loss"] for r in
                                              read_metrics(tmp_path / "behind")]


_KILLED_LOGGER = """
import os, signal, sys
from meta_train.tracking import MetricsLogger
logger = MetricsLogger(sys.argv[1], {}, "offline")
for t in range(13):
    logger.log(t, {"meta_loss": 1.0 / (t + 1), "alpha": 0.1 + t})
os.kill(os.getpid(), signal.SIGKILL)
"""


def _subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), LOPT_DATA_DIR=DATA, WANDB_SILENT="true")
    env.pop("XLA_FLAGS", None)
    env.pop("WANDB_SERVICE", None)  # its own wandb service, killed with it (not this process's)
    return env


def test_rows_wandb_lost_to_a_kill_9_are_sent_once_on_resume(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILLED_LOGGER, str(tmp_path)],
                          env=_subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(13))
    # The premise: wandb's service had not written every row it was sent when the kill came.
    assert len(_wandb_steps(tmp_path)) < 13

    logger = MetricsLogger(tmp_path, {}, "offline", resume_step=10)  # checkpoint at step 10
    _log_steps(logger, range(10, 20))
    logger.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    rows = wandb_history(tmp_path, run_id)
    assert sorted(r["step"] for r in rows) == list(range(20))  # each step exactly once
    logged = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(logged) == list(range(20))
    assert all(r["meta_loss"] == logged[r["step"]]["meta_loss"] for r in rows)


_KILLED_RUN = """
import os, signal, sys
from meta_train import MetaTrainConfig, checkpoint, meta_train
from meta_train.tracking import MetricsLogger
real_log = MetricsLogger.log
def log(self, step, metrics):
    real_log(self, step, metrics)
    if step == 12:
        os.kill(os.getpid(), signal.SIGKILL)
MetricsLogger.log = log
meta_train(MetaTrainConfig.from_json(sys.argv[1]), progress=False)
"""


@pytest.mark.slow  # about 40 s on 2 loaded cores: two compilations of the outer step
def test_meta_train_killed_and_resumed_has_every_row_once_in_metrics_and_wandb(tmp_path):
    out = tmp_path / "run"
    cfg = MetaTrainConfig(task="mlp_fmnist_tiny", optimizer="sgdm", population=4, truncation=5,
                          horizon=20, std=0.05, loss_cap=8.0, shard=False, wandb="offline",
                          outer_steps=40, checkpoint_every=5, out=str(out))
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, cfg.to_json()],
                          env=_subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(13))
    assert checkpoint.latest(out)["step"] == 10
    # The premise: wandb's service had not written every row it was sent when the kill came.
    assert len(_wandb_steps(out)) < 13

    resumed = meta_train(cfg.replace(resume=True, outer_steps=20), progress=False)
    assert resumed.steps_done == 20
    assert [r["step"] for r in read_metrics(out)] == list(range(20))
    assert sorted(_wandb_steps(out)) == list(range(20))  # each step exactly once


def test_without_the_wandb_extra_metrics_go_to_the_jsonl_only(tmp_path, monkeypatch):
    # pip install learned-opt (no [wandb]): the default offline mode must not crash a run.
    from meta_train import tracking

    monkeypatch.setattr(tracking, "is_installed", lambda name: name != "wandb")
    with pytest.warns(UserWarning, match=r"learned-opt\[wandb\]"):
        assert tracking.usable_wandb_mode("offline") == "disabled"
    assert tracking.usable_wandb_mode("disabled") == "disabled"
    with pytest.warns(UserWarning, match="not installed"):
        logger = MetricsLogger(tmp_path, {"seed": 0}, mode="offline")
    logger.log(0, {"meta_loss": 1.5})
    logger.close()
    assert logger.run is None and not (tmp_path / "wandb").exists()
    assert read_metrics(tmp_path) == [{"step": 0, "meta_loss": 1.5}]


def test_missing_extras_are_named():
    from learned_opt.extras import import_optional

    with pytest.raises(ImportError, match=r"pip install 'learned-opt\[tasks\]'"):
        import_optional("tensorflow_datasets_not_here", "tasks")
    with pytest.raises(ValueError, match="extra must be one of"):
        import_optional("json", "gpu")
