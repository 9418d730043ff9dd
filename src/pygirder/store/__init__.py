"""The Redis protocol of the grid: the key schema and the server-side scripts."""

from .keys import Keys

__all__ = ["Keys"]
