"""Models: the Llama-family :class:`TransformerLM` (and its hybrid form), SSM mixers, loading."""

from distil.models.io import load
from distil.models.transformer import ModelConfig, TransformerLM

__all__ = ["ModelConfig", "TransformerLM", "load", "Mamba2Mixer", "DiscreteMamba2Mixer"]


def __getattr__(name):  # the SSM mixers load lazily: a plain transformer never imports them
    if name in ("Mamba2Mixer", "DiscreteMamba2Mixer"):
        from distil.models import ssm

        return getattr(ssm, name)
    raise AttributeError(name)
