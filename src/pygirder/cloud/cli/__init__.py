"""The ``pygirder cloud`` command line: parsing and rendering over the cloud's verbs.

:mod:`.account` holds the account commands (``plan``, ``setup``, ``status``,
``teardown``, ``policy``) and mounts :mod:`.fleet`, :mod:`.image`, :mod:`.artifact`
and :mod:`.simulate`.  Nothing here needs boto3 to import: AWS code is imported
inside the commands.
"""

from __future__ import annotations

from .account import app

__all__ = ["app"]
