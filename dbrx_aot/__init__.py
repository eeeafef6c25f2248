"""dbrx-aot: DBRX ahead of time, as AOTInductor packages and ONNX models, with pluggable runtimes.

The public API: ``load_runtime`` (a checkpoint or artifact directory -> a runtime), ``generate``
(the generation loop over any runtime), ``Tokenizer``, ``DbrxConfig`` and ``DbrxAotError``.
"""

from dbrx_aot.config import DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.generate import generate, sample
from dbrx_aot.runtimes import KVCache, Runtime, load_runtime
from dbrx_aot.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["DbrxAotError", "DbrxConfig", "KVCache", "Runtime", "Tokenizer", "generate", "load_runtime",
           "sample", "__version__"]
