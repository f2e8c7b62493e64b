"""How the fan-in factor was chosen: a checkpoint with each matrix's step times
``(reference / fan_in) ** power`` (applied after the schedule; the shipped checkpoint applies it
inside the rule, with ``DirectionConfig.reference_fan_in``: the same arithmetic up to float
rounding, which moves single runs by a few 1e-3). Writes the candidates' JSONs beside the other
held-out results; the tables come from ``scripts/evaluate_direction.py --scorecard LABEL``.

  python results/direction/fan_in/explore_fan_in.py direction_elementwise_family \\
      "direction_elementwise magnitude adam b2 0.999 v2@7500" \\
      mlp_deep_wide,residual_mlp,cnn_3conv,gru_lm,transformer_lm 2000 128:0.5,128:1

(args: checkpoint, label, architectures, horizons, reference:power pairs; power 0 = no factor).
``direction_elementwise_family`` was then still the checkpoint without the factor: use
``results/direction/v2/elementwise_adam999/run/snapshots/step_0007500`` to rerun this.
"""
import sys

import jax
import optax

import learned_opt
from learned_opt.checkpoint import optax_for
from learned_opt.direction import FAN_IN_POWER, fan_in_factor
from meta_train.evaluation import Candidate
from meta_train.experiments.heldout import evaluate_candidates


def scale_by_fan_in(reference, power):
    def update(updates, state, params=None):
        return jax.tree.map(
            lambda u, p: u * (fan_in_factor(p.shape, reference) ** (power / FAN_IN_POWER)
                              if power else u), updates, params), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def main(checkpoint, label, archs, horizons, laws):
    lopt, meta = learned_opt.load(checkpoint)
    cands = {}
    for ref, power in (tuple(float(x) for x in law.split(":")) for law in laws.split(",")):
        name = label if power == 0 else f"{label} fan-in {int(ref)}^{power:g}"
        cands[name] = Candidate(lambda task, steps, ref=int(ref), power=power: optax.chain(
            optax_for(lopt, meta, steps, task.perm_spec), scale_by_fan_in(ref, power)))
    evaluate_candidates(cands, archs.split(","), [int(h) for h in horizons.split(",")],
                        "results/direction/heldout", [100, 101, 102], [200, 201])


if __name__ == "__main__":
    main(*sys.argv[1:])
