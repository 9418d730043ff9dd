"""The grid: client, worker runtime, and the async core they share."""
