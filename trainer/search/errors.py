"""The search's failure domain: bad search input is a :class:`SearchError` (one line, exit 2)."""

from __future__ import annotations

__all__ = ["SearchError"]


class SearchError(ValueError):
    """Bad input for a search (unknown sampler, malformed space, no feasible candidate, ...).

    The message is one line for the user; nothing has been written when it is raised before
    the study starts.
    """
