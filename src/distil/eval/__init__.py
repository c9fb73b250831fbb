"""Evaluation: held-out loss and perplexity, agreement with the teacher, multiple choice."""
