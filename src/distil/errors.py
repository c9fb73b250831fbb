"""User-facing errors.

A :class:`DistilError` (a ``ValueError``) means bad input from the user: the CLI prints its message
on one line and exits with code 2, with no traceback unless ``--debug`` is given.
"""


class DistilError(ValueError):
    """Bad input: a config typo, a missing checkpoint, an empty corpus, mismatched vocabularies."""
