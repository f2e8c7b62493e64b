"""learned_opt: permutation-equivariant weight-space networks and learned optimizers in JAX.

Weight-space layers (UNF, Deep Set, NFN), permutation specs and their checks, learned optimizers
with an inner-loop interface and an optax adapter, learned-direction rules as optax
transformations (``scale_by_learned_direction``), checkpoints, and hand-designed baselines.
"""

from learned_opt import hand_designed, presets
from learned_opt.adapters import agnostic_optax
from learned_opt.check import check_perm_spec
from learned_opt.checkpoint import CheckpointError, list_pretrained, load, load_optax, save
from learned_opt.config import LearnedOptimizerConfig
from learned_opt.deepset import DeepSetLinear
from learned_opt.direction import (
    DirectionConfig,
    default_schedule,
    learned_direction,
    scale_by_learned_direction,
)
from learned_opt.infer import infer_perm_spec
from learned_opt.nfn import NFNLinear
from learned_opt.optimizer import LearnedOptimizer, LearnedOptimizerState
from learned_opt.optimizers import learned_optimizer, list_agnostic_optimizers, list_optimizers
from learned_opt.spec import (
    PermSpecError,
    label_sizes,
    permute,
    random_permutations,
    spec_leaves,
)
from learned_opt.statnn import statnn_features
from learned_opt.unf import UNF, InvariantUNF, UNFLinear, num_basis_terms
from learned_opt.universal import UniversalDeepSetLinear, UniversalUNFLinear
from learned_opt.weight_space import WeightSpace

__all__ = [
    # Permutation specs.
    "PermSpecError",
    "label_sizes",
    "permute",
    "random_permutations",
    "spec_leaves",
    "check_perm_spec",
    "infer_perm_spec",
    # Weight-space layers and networks.
    "UNFLinear",
    "UNF",
    "InvariantUNF",
    "num_basis_terms",
    "DeepSetLinear",
    "NFNLinear",
    "UniversalUNFLinear",
    "UniversalDeepSetLinear",
    "statnn_features",
    # Learned optimizers.
    "LearnedOptimizer",
    "LearnedOptimizerConfig",
    "LearnedOptimizerState",
    "learned_optimizer",
    "list_optimizers",
    "list_agnostic_optimizers",
    "agnostic_optax",
    # Learned-direction rules (the step size outside, as an optax schedule).
    "DirectionConfig",
    "scale_by_learned_direction",
    "learned_direction",
    "default_schedule",
    "list_pretrained",
    "save",
    "load",
    "load_optax",
    "CheckpointError",
    "WeightSpace",
    "presets",
    "hand_designed",
]
