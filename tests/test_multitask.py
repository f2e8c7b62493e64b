"""Meta-training one optimizer on several tasks: member groups, staggering, normalised fitness,
per-task metrics, exact resume, and clear refusals.

Tiny tasks and ``sgdm`` (2 meta-parameters, weight-space agnostic) keep compile times low.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from meta_train import ConfigError, MetaTrainConfig, meta_train
from meta_train import train as mt
from meta_train.multitask import MultiTaskProblem, group_members

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))

TASKS = "mlp_fmnist_tiny,rnn_lm_tiny"
MULTI = dict(task=TASKS, optimizer="sgdm", population=8, truncation=5, horizon=20,
             outer_lr=0.05, std=0.05, wandb="disabled", shard=False)


def test_each_task_gets_whole_antithetic_pairs():
    groups = group_members(12, 3)
    members = np.concatenate(groups)
    assert sorted(members) == list(range(12))
    for g in groups:  # member i and its partner i + N/2 are in the same group
        assert set((g + 6) % 12) == set(g)
    with pytest.raises(ValueError, match="whole antithetic pairs"):
        group_members(12, 4)


@pytest.fixture(scope="module")
def setup():
    return mt.build(MetaTrainConfig(**MULTI, outer_steps=4))


def test_episodes_staggered_within_each_task(setup):
    lengths = np.asarray(setup.estimator.first_lengths())
    for idx in group_members(8, 2):  # 2 pairs per task: offsets 0 and T/2 in each task
        assert sorted(set(lengths[idx].tolist())) == [10, 20]


def test_fitness_normalised_per_task_and_metrics_per_task(setup, tmp_path):
    problem = setup.estimator.problem
    assert isinstance(problem, MultiTaskProblem) and problem.names == tuple(TASKS.split(","))
    result = meta_train(MetaTrainConfig(**MULTI, outer_steps=2, out=str(tmp_path / "run")),
                        progress=False, setup=setup)
    row = result.history[0]
    raw = [row[f"meta_loss/{n}"] for n in problem.names]
    # The fitness (meta_loss) is the mean of each task's losses over its reference loss; the
    # two tasks' raw losses differ (about 2.3 against 5.5) but both start near 1.
    normalised = [r / ref for r, ref in zip(raw, problem.reference, strict=True)]
    np.testing.assert_allclose(row["meta_loss"], np.mean(normalised), rtol=1e-5)
    assert raw[1] > 2 * raw[0] and 0.8 < row["meta_loss"] < 1.2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {f"nonfinite/{n}" for n in problem.names} <= set(rows[0])


def test_resume_is_exact(setup, tmp_path):
    whole = meta_train(MetaTrainConfig(**MULTI, outer_steps=4, out=str(tmp_path / "a")),
                       progress=False, setup=setup)
    meta_train(MetaTrainConfig(**MULTI, outer_steps=2, out=str(tmp_path / "b")),
               progress=False, setup=setup)
    resumed = meta_train(MetaTrainConfig(**MULTI, outer_steps=4, out=str(tmp_path / "b"),
                                         resume=True), progress=False, setup=setup)
    for a, b in zip(jax.tree.leaves(whole.meta_params), jax.tree.leaves(resumed.meta_params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert whole.meta_params["log_alpha"] != setup.init_meta_params["log_alpha"]


def test_refusals():
    with pytest.raises(ConfigError, match="binds its meta-parameters"):
        mt.build(MetaTrainConfig(**(MULTI | {"optimizer": "unf"}), outer_steps=1))
    with pytest.raises(ConfigError, match="whole antithetic pairs"):
        MetaTrainConfig(**(MULTI | {"population": 6}))
    with pytest.raises(ConfigError, match="TASK="):
        MetaTrainConfig(**MULTI, task_args={"hidden_sizes": [4]})
    with pytest.raises(ConfigError, match="distinct"):
        MetaTrainConfig(**(MULTI | {"task": "mlp_fmnist_tiny,mlp_fmnist_tiny"}))
    with pytest.raises(ConfigError, match="loss cap is automatic"):
        MetaTrainConfig(**MULTI, loss_cap=5.0)


def test_throughput_printed_once_after_compilation(setup, tmp_path, capsys):
    meta_train(MetaTrainConfig(**MULTI, outer_steps=7, out=str(tmp_path / "run")),
               progress=False, setup=setup)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("steady state")]
    assert len(lines) == 1 and "member inner steps/s" in lines[0]
