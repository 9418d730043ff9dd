"""The service options of the ``pygirder`` commands (server, worker, distributor,
oneshot) and the import path for user services::

    from pygirder.cli.service import ServiceContext, service

The machinery is :mod:`pygirder.service`, outside the command line, because code that
is not the ``pygirder`` command runs through it too (the agent on a cloud instance);
this module is the command line's face of it.
"""

from __future__ import annotations

from ..service import LOG_LEVELS, ServiceContext, default_service_id, load_options, service

__all__ = ["LOG_LEVELS", "ServiceContext", "default_service_id", "load_options", "service"]
