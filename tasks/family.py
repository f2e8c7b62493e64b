"""The meta-training task family of the learned-direction optimizers: many small, cheap tasks.

Celo2 meta-trains on four 8x8 image MLPs and generalises to far larger networks; this family
adds other widths and depths, grey CIFAR-10 at 8x8, one small CNN, and small byte LMs (a ReLU
RNN, an LSTM, Transformers of one and two blocks) so that the weight-space layer's map types of
those architectures get meta-gradient signal; ``FAMILY_V1`` is the first eight (the family the
shipped rules were meta-trained on). No GRU: the GRU LM is a held-out architecture. Every
member of the family is a registered task (``tasks.get_task``), named ``fam_*``; none has the
size of a held-out evaluation architecture (the paper's four tasks at their defaults included).

``FAMILY`` lists them; ``python -m meta_train --task $(python -c ...)`` or
:func:`family_task_list` gives the comma-separated list ``MetaTrainConfig.task`` takes.

Example:
  >>> len(FAMILY) >= 4 and all(n.startswith("fam_") for n in FAMILY)
  True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.infer import infer_perm_spec
from tasks import data as datasets
from tasks.base import ClassificationTask, LanguageModelTask, Task
from tasks.models import MLP, CellLM
from tasks.registry import (
    TASKS,
    CNNConfig,
    MLPConfig,
    RNNLMConfig,
    TaskEntry,
    TransformerLMConfig,
    build_cnn_cifar10,
    build_mlp_fmnist,
    build_rnn_lm,
    build_transformer_lm,
    device_data,
    mlp_spec,
)


@dataclasses.dataclass(frozen=True)
class GreyCifarMLPConfig:
    """CIFAR-10 at 8x8 grey (2x2 area average of the 16x16 images, channel mean), pixels / 255."""

    hidden_sizes: tuple[int, ...] = (32,)
    num_classes: int = 10
    batch_size: int = 64
    data_source: str = ""


def _grey_cifar8(data_dir) -> dict:
    raw = datasets.load_cifar10(data_dir)
    out = {}
    for split, arrays in raw.items():
        x = arrays["inputs"].astype(np.float32).reshape(-1, 8, 2, 8, 2, 3).mean(axis=(2, 4, 5))
        out[split] = {"inputs": x, "labels": arrays["labels"]}
    return out


def build_mlp_grey_cifar8(config: GreyCifarMLPConfig, data_dir=None) -> Task:
    source_dir = datasets.resolve_data_dir(data_dir)
    data = device_data(_grey_cifar8, source_dir)
    config = dataclasses.replace(config, data_source="CIFAR-10 8x8 grey")
    n = len(config.hidden_sizes)
    return ClassificationTask("mlp_grey_cifar8", config, MLP(config.hidden_sizes,
                              config.num_classes), data, mlp_spec(n), input_scale=1.0 / 255)


def build_lstm_lm(config: RNNLMConfig, data_dir=None) -> Task:
    """The RNN LM's byte streams and sizes with an LSTM cell (spec inferred)."""
    text = build_rnn_lm(config, data_dir)
    model = CellLM(config.vocab_size, config.embed_dim, config.hidden, cell="lstm")
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, config.seq_len), jnp.int32))
    return LanguageModelTask("lstm_lm", text.config, model, text.data,
                             infer_perm_spec(params["params"]))


FAMILY: dict[str, TaskEntry] = {
    "fam_mlp_fmnist_16": TaskEntry(build_mlp_fmnist, MLPConfig((16,), batch_size=64)),
    "fam_mlp_fmnist_64x64": TaskEntry(build_mlp_fmnist, MLPConfig((64, 64), batch_size=64)),
    "fam_mlp_fmnist_128": TaskEntry(build_mlp_fmnist, MLPConfig((128,), batch_size=32)),
    "fam_mlp_cifar8_32": TaskEntry(build_mlp_grey_cifar8, GreyCifarMLPConfig((32,))),
    "fam_mlp_cifar8_64x32": TaskEntry(build_mlp_grey_cifar8, GreyCifarMLPConfig((64, 32))),
    "fam_cnn_cifar_8x16": TaskEntry(build_cnn_cifar10, CNNConfig((8, 16), (2, 2),
                                                                 batch_size=32)),
    "fam_rnn_lm_32": TaskEntry(build_rnn_lm, RNNLMConfig(embed_dim=16, hidden=32, seq_len=16,
                                                         batch_size=16)),
    "fam_transformer_lm_16": TaskEntry(build_transformer_lm, TransformerLMConfig(
        width=16, num_heads=2, mlp_dim=32, num_blocks=1, seq_len=16, batch_size=8)),
    "fam_lstm_lm_32": TaskEntry(build_lstm_lm, RNNLMConfig(embed_dim=16, hidden=32, seq_len=16,
                                                           batch_size=16)),
    "fam_rnn_lm_48x24": TaskEntry(build_rnn_lm, RNNLMConfig(embed_dim=24, hidden=48,
                                                            seq_len=16, batch_size=16)),
    "fam_transformer_lm_24x2": TaskEntry(build_transformer_lm, TransformerLMConfig(
        width=24, num_heads=3, mlp_dim=48, num_blocks=2, seq_len=16, batch_size=8)),
}
FAMILY_V1 = tuple(FAMILY)[:8]
TASKS.update(FAMILY)


def family_task_list(names=None) -> str:
    """The family (or ``names`` of it) as ``MetaTrainConfig.task`` takes it: comma-separated."""
    names = list(FAMILY) if names is None else list(names)
    unknown = sorted(set(names) - set(FAMILY))
    if unknown:
        raise ValueError(f"not in the task family: {unknown}; members: {list(FAMILY)}")
    return ",".join(names)
