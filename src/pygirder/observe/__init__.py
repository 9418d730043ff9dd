"""What the grid is doing, read from its server: status snapshots and the log stream.

Runs wherever an operator looks at a grid.  ``pygirder status``/``inspect``/``logs``
(``pygirder.cli``) and the dashboard (``pygirder.dashboard``) render what these return;
the worker writes the log stream through :func:`logs.install_grid_logging`.
"""
