"""Errors of the search layer."""

from __future__ import annotations


class SearchError(ValueError):
    """A search cannot run as asked.

    The message is one line that a command-line interface can print as it is, with a hint
    about what to use instead.
    """
