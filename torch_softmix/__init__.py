"""torch_softmix: softmax mixtures over a frozen output embedding, fitted by warm-started EM.

Data path: tokens -> :class:`TokenCounts` -> starts -> EM (:class:`EMFitter`) -> :class:`SoftmaxMixtureHead`
-> file or model (:mod:`torch_softmix.hf`).
"""

from .data import TokenCounts
from .design import Design
from .em import ConvergenceWarning, EMFitter
from .head import SoftmaxMixtureHead
from .mos import MixtureOfSoftmaxesHead
from .search import FitEvent
from .system import tune_memory_allocator

__all__ = [
    "ConvergenceWarning",
    "Design",
    "EMFitter",
    "FitEvent",
    "MixtureOfSoftmaxesHead",
    "SoftmaxMixtureHead",
    "TokenCounts",
    "tune_memory_allocator",
]
__version__ = "0.1.0"
