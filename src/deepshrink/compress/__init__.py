"""The compression stages, each a re-parametrization of a model's weights.

Targets (:mod:`.targets`) name the weights a stage touches; pruning (:mod:`.prune`,
:mod:`.groups`, :mod:`.balance`), weight sharing (:mod:`.quantize`) and ternary
quantization (:mod:`.ternary`) install :class:`Compression` parametrizations
(:mod:`.parametrization`) that hold through training (:mod:`.train`,
:mod:`.schedules`); :mod:`.sensitivity` picks per-layer sparsities and
:mod:`.surgery` cuts emptied channels out. :func:`compressed_tensors` turns the
result into CompressedTensors.
"""

from deepshrink.compress.balance import load_balance, prune_balanced_
from deepshrink.compress.groups import prune_groups_
from deepshrink.compress.parametrization import Compression, current_mask, register_compression, restore_
from deepshrink.compress.prune import Mask, prune_, sparsity_report
from deepshrink.compress.quantize import SharedWeight, compressed_tensors, load_compressed_, share_weights_
from deepshrink.compress.schedules import gradual_prune
from deepshrink.compress.sensitivity import sensitivity_scan
from deepshrink.compress.surgery import shrink
from deepshrink.compress.targets import find_targets
from deepshrink.compress.ternary import TernaryWeight, ternarize_
from deepshrink.compress.train import TrainConfig, evaluate, fit, iterative_prune, scale_dropout_
from deepshrink.lazy import lazy_submodules

__all__ = [
    "Compression",
    "Mask",
    "SharedWeight",
    "TernaryWeight",
    "TrainConfig",
    "compressed_tensors",
    "current_mask",
    "evaluate",
    "find_targets",
    "fit",
    "gradual_prune",
    "iterative_prune",
    "load_balance",
    "load_compressed_",
    "prune_",
    "prune_balanced_",
    "prune_groups_",
    "register_compression",
    "restore_",
    "scale_dropout_",
    "sensitivity_scan",
    "share_weights_",
    "shrink",
    "sparsity_report",
    "ternarize_",
]

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
