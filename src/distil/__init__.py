"""distil: distil a transformer language model into a smaller transformer or an attention/SSM hybrid.

Entry points: the ``distil`` command (see ``distil --help``), and the Python API::

    from distil.models import TransformerLM
    from distil.losses import kd_loss, topk_kd_loss, fused_linear_kd_loss
"""

__version__ = "0.1.0"

from distil.runtime import tune_allocator as _tune_allocator

_tune_allocator()  # large freed blocks are reused instead of re-faulted; see distil/runtime.py
