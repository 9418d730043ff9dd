"""Which code a request may make a worker import, and loading the client's script.

A request names its function as ``module:qualname``, and anybody who can reach the
server can put any name in a request.  So a worker imports a module for a request
only when it was allowed to: the modules and packages it was told to ``--import`` or
``--allow-module`` (the local workers of ``pygirder.connect()`` are allowed the
packages of the grid functions their client had registered), modules whose file lies
in the client script's folder, and the script itself for ``__main__``.  The files of
the named module and of its packages must belong to the worker's user (or root), so a
module another local user dropped into a shared folder never runs, whatever its name.
``--auto-import`` lifts the rule for trusted grids.

The client's script is loaded as ``__mp_main__`` when a request first names one of its
functions, as multiprocessing's spawn does; its ``if __name__ == "__main__":`` block
does not run, and a grid start on its top level (a script without that guard) ends
the load there, with the functions defined above it registered.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImportRefused  # defined with the core's other errors; imported from here too

MAIN_GUARD = 'if __name__ == "__main__":'
log = logging.getLogger("pygirder.worker")


class _GridStartInScript(BaseException):
    """Ends a worker's load of the client's script at its first grid start.

    A BaseException, so the script's own ``except Exception`` does not swallow it.
    """

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


_loading: dict[int, str] = {}  # thread id -> script being loaded on that thread


def stop_if_loading_script(what: str = "pygirder.connect()") -> None:
    """Called when a grid starts: inside a worker's load of the client's script, stop.

    Without a main guard the script's top level runs in every worker that loads it;
    starting a grid there would start servers and workers from each worker.
    """
    path = _loading.get(threading.get_ident())
    if path is None:
        return
    where = path
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == path:
            where = f"{path}:{frame.f_lineno}"
            break
        frame = frame.f_back  # type: ignore[assignment]
    raise _GridStartInScript(f"{what} at {where}")


@dataclass
class ScriptLoad:
    """What loading the client's script in this worker gave."""

    path: str
    stopped_at: str | None = None  # the grid start that ended the top level
    error: str | None = None  # what the top level raised

    def explain_missing(self, name: str) -> str:
        """Why ``name`` (of ``__main__``) is not registered after the script was loaded."""
        if self.stopped_at:
            return (
                f"{name} is not defined in {self.path} before its grid start ({self.stopped_at}); "
                "a worker loading a script without a main guard stops there. Put the code "
                f"that starts the grid under `{MAIN_GUARD}` (as with multiprocessing), or "
                "define grid functions above that line"
            )
        if self.error:
            return (
                f"{name} could not be loaded: the top level of {self.path} raised {self.error} "
                "in the worker, which runs the script's top level (not its "
                f"`{MAIN_GUARD}` block) to find its grid functions. Move the code that "
                f"failed under `{MAIN_GUARD}`"
            )
        return (
            f"{name} is not a grid function defined at the top level of {self.path}; "
            "decorate a module-level `def` with @pygirder.fn"
        )


_scripts: dict[str, ScriptLoad] = {}


def load_main_script(path: str) -> ScriptLoad:
    """Import the client's script as ``__mp_main__`` once; say how far its top level ran.

    User code is hostile: whatever its top level raises (``SystemExit`` included) is
    recorded, not propagated, and the functions defined before it stay registered.
    While it loads, ``sys.argv`` is just the script: the worker's own arguments are
    nothing the script should parse.
    """
    done = _scripts.get(path)
    if done is not None:
        return done
    state = _scripts[path] = ScriptLoad(path)
    module = types.ModuleType("__mp_main__")
    module.__file__ = path
    sys.modules["__mp_main__"] = module
    _loading[threading.get_ident()] = path
    argv, sys.argv = sys.argv, [path]
    try:
        code = compile(Path(path).read_bytes(), path, "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except _GridStartInScript as stop:
        state.stopped_at = stop.where
    except BaseException as exc:  # user code may raise anything: reported to the caller
        state.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        sys.argv = argv
        _loading.pop(threading.get_ident(), None)
    if state.error:
        log.warning("loading %s stopped: %s", path, state.error)
    return state


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


class ImportPolicy:
    """The modules a request may make this worker import (see the module docstring)."""

    def __init__(
        self,
        modules: tuple[str, ...] = (),
        *,
        script_dir: str | None = None,
        auto_import: bool = False,
    ) -> None:
        self.modules = tuple(m for m in modules if m)
        self.script_dir = script_dir
        self.auto_import = auto_import

    def allows_name(self, module: str) -> bool:
        """``module`` is one of the allowed modules, or inside an allowed package."""
        return any(module == m or module.startswith(m + ".") for m in self.modules)

    def import_for_request(self, module: str) -> None:
        """Import ``module`` if the policy allows it; else raise :class:`ImportRefused`.

        Each part of the dotted name not imported yet is located first (finding runs
        no code) and checked: allowed by name or lying in the script's folder, and its
        file owned by this user or root.  Then the ordinary import runs.
        """
        if self.auto_import:
            importlib.import_module(module)
            return
        parts = module.split(".")
        if "__main__" in parts:  # a package's command-line entry point, not grid code
            raise ImportRefused(f"{module!r} is a program's entry point, not a module of grid code")
        by_name = self.allows_name(module)
        if not by_name and self.script_dir is None:
            raise ImportRefused(self._not_allowed(module))
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in sys.modules:
                continue
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError) as exc:
                raise ImportError(f"{exc}") from None
            if spec is None:
                if by_name:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                raise ImportRefused(self._not_allowed(module))
            files = [spec.origin] if spec.has_location and spec.origin else []
            places = files or list(spec.submodule_search_locations or [])
            in_script_dir = bool(places) and all(
                self.script_dir is not None and _under(p, self.script_dir) for p in places
            )
            if not (by_name or in_script_dir):
                raise ImportRefused(self._not_allowed(module))
            for file in files:
                _check_owner(module, file)
            importlib.import_module(name)

    def _not_allowed(self, module: str) -> str:
        where = f" and modules in {self.script_dir}" if self.script_dir else ""
        allowed = ", ".join(self.modules) or "none"
        return (
            "a request may only name modules this worker was allowed to import (allowed "
            f"packages: {allowed}{where}). If {module!r} is your code, start `pygirder "
            f"worker` with `--allow-module {module}` or `--import {module}`; with "
            "pygirder.connect(), import the module before connect() or keep it next to "
            "your script"
        )


def _check_owner(module: str, file: str) -> None:
    """Code another local user could have written must not run as this worker's user."""
    try:
        owner = os.stat(file).st_uid
    except OSError as exc:
        raise ImportError(f"cannot read {file}: {exc}") from None
    me = os.getuid()
    if owner not in (me, 0):
        raise ImportRefused(
            f"{file} belongs to uid {owner}, not to this worker's user (uid {me}) or root; "
            f"a worker does not run code another user may have written. Make {module!r} "
            "belong to the worker's user, or --import it explicitly"
        )
