"""Data: corpora, tokenizers, packing into training windows."""
