"""torch_softmix: softmax mixtures over a frozen output embedding, fitted by warm-started EM.

Data path: tokens -> :class:`TokenCounts` -> :class:`EMFitter` -> :class:`SoftmaxMixtureHead` -> file.
"""

from .data import TokenCounts
from .em import EMFitter
from .head import SoftmaxMixtureHead
from .system import tune_memory_allocator

__all__ = ["EMFitter", "SoftmaxMixtureHead", "TokenCounts", "tune_memory_allocator"]
__version__ = "0.1.0"
