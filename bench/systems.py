"""The systems under benchmark, by name; each is imported only when it is used.

A system's module imports its framework at the top, so a child process that measures
Dask never imports Ray (and its memory is not counted against Dask).
"""

from __future__ import annotations

import importlib
from typing import Any

import harness

NAMES = ("pygirder", "ray", "dask", "celery")

_CLASSES = {
    "pygirder": ("sys_pygirder", "PygirderSystem"),
    "ray": ("sys_ray", "RaySystem"),
    "dask": ("sys_dask", "DaskSystem"),
    "celery": ("sys_celery", "CelerySystem"),
}


def system_class(name: str) -> Any:
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def create(name: str) -> harness.System:
    """A new, not yet started, system."""
    return system_class(name)()


def attach(name: str, conn: dict[str, Any]) -> Any:
    """A client of a system another process started (``conn`` from its ``conn_info()``)."""
    return system_class(name).attach(conn)
