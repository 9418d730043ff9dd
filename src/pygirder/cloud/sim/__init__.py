"""The local stand-in for EC2: a data plane that runs "instances" as processes.

:mod:`.simulator` turns moto's instances into local processes that boot the real
user-data, over :mod:`.proctree` (their process trees) and :mod:`.control` (its
state directory and the requests other processes post to it); :mod:`.imds` is the
IMDSv2 each one sees, :mod:`.siminit` their init process and :mod:`.shutdown` the
``shutdown`` inside one; :mod:`.rehearse` runs setup, ``up``, a job, ``down`` and
``teardown`` against moto with them.
"""

from __future__ import annotations

from ...errors import PygirderError


class SimulatorError(PygirderError):
    """The data plane cannot do what was asked (endpoint unreachable, unknown instance, ...)."""


class SimulatorTimeout(SimulatorError, TimeoutError):
    """:meth:`Simulator.wait_for` ran out of time; the message holds the instance's logs."""
