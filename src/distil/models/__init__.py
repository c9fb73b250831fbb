"""Models: the Llama-family :class:`TransformerLM` (and its hybrid form), SSM mixers, loading and saving.

    model = load("path")                           # native, transformers (Llama, Mistral, Qwen2/3, Gemma 3, SmolLM3, Phi-3), or .gguf
    save(model, "out/student", tokenizer=tok)      # native: config.json + model.safetensors
    save_hf(model, "out/hf")                       # transformers' LlamaForCausalLM format
"""

from distil.models.hf import load_hf, save_hf
from distil.models.io import save_native as save
from distil.models.loading import load
from distil.models.ssm import DiscreteMamba2Mixer, Mamba2Mixer
from distil.models.transformer import ModelConfig, TransformerLM

__all__ = ["ModelConfig", "TransformerLM", "load", "save", "load_hf", "save_hf", "Mamba2Mixer", "DiscreteMamba2Mixer"]
