"""``pygirder dashboard``: a live web page of a grid (workers, pools, throughput, calls).

The app is built by :func:`create_app`; Starlette and uvicorn (the ``dashboard``
extra: ``pip install 'pygirder[dashboard]'``) are imported only when it is called.
The page itself is static HTML, CSS and JavaScript in ``static/``: no build step and
nothing loaded from the network.
"""

from __future__ import annotations

from .app import FleetSource, create_app, default_fleet_source, serve_in_thread

__all__ = ["FleetSource", "create_app", "default_fleet_source", "serve_in_thread"]
