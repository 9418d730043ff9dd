"""Which function a request names, and whether this worker may run it.

A request names a function by ``module:qualname`` and carries the caller's code
fingerprint; the worker imports the module only as ``grid.loading`` allows, and
refuses (with an error that says how to fix it) a name it cannot find or code that
differs from the caller's.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from concurrent.futures import Executor
from typing import Any

from ... import calls as calls_mod
from ...calls import GridFunction
from .. import loading

log = logging.getLogger("pygirder.worker")


class RefusedRequest(Exception):
    """A request this worker must not run (unknown function, other code version)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Functions:
    """Finds (importing if allowed) the grid functions requests name, for one worker."""

    def __init__(
        self,
        *,
        worker_id: str,
        pool: str,
        imports: tuple[str, ...],
        allow_modules: tuple[str, ...],
        auto_import: bool,
        main_path: str | None,
    ) -> None:
        self.worker_id = worker_id
        self.pool = pool
        self.imports = imports
        self.main_path = main_path
        self.policy = loading.ImportPolicy(
            (*imports, *allow_modules),
            script_dir=os.path.dirname(os.path.abspath(main_path)) if main_path else None,
            auto_import=auto_import,
        )

    def load_code(self) -> None:
        """Import the ``--import`` modules.  The client's script waits for a request."""
        for module in self.imports:
            importlib.import_module(module)

    def lookup(
        self, name: str, fingerprint: str, load_script: bool = False
    ) -> GridFunction[..., Any]:
        """The function ``name`` with the caller's ``fingerprint``, or RefusedRequest."""
        if load_script and self.main_path:
            loading.load_main_script(self.main_path)
        gf = calls_mod.lookup(name)
        module = name.partition(":")[0]
        if gf is None and module == "__main__":
            gf = self._script_function(name)
        elif gf is None:
            self._import_for(name, module)
            gf = calls_mod.lookup(name)
        if gf is None:
            raise RefusedRequest(
                "unknown function",
                f"{name} is not a registered grid function on worker {self.worker_id} (pool "
                f"{self.pool!r}); start the worker with `--import {module}` "
                "so the module defining it is imported",
            )
        if gf.fingerprint != fingerprint:
            raise RefusedRequest(
                "code version mismatch",
                f"code version mismatch for {name}: the caller's code has fingerprint "
                f"{fingerprint}, worker {self.worker_id} has {gf.fingerprint}. Run the same "
                "code on callers and workers (restart the workers after changing it), or pin "
                "@pygirder.fn(version=...)",
            )
        return gf

    async def load(
        self, name: str, fingerprint: str, args_bytes: bytes, threads: Executor
    ) -> GridFunction[..., Any]:
        """``lookup``, importing in a thread when it must: a slow import (a script's
        top level, a heavy package) holds the baton but must not stop the heartbeat.

        Arguments naming a class of the client's script (``__main__:Point``) need the
        script loaded to decode, whichever module the function comes from.
        """
        script = (
            self.main_path is not None
            and b"__main__:" in args_bytes
            and "__mp_main__" not in sys.modules
        )
        if calls_mod.lookup(name) is not None and not script:
            return self.lookup(name, fingerprint)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(threads, self.lookup, name, fingerprint, script)

    def _import_for(self, name: str, module: str) -> None:
        """Import the module a request names, if this worker may (see ``loading``)."""
        try:
            self.policy.import_for_request(module)
        except loading.ImportRefused as exc:
            log.warning("refused to import %r for %s: %s", module, name, exc)
            raise RefusedRequest(
                "import refused",
                f"worker {self.worker_id} cannot import module {module!r} for {name}: {exc}",
            ) from None
        except ImportError as exc:
            raise RefusedRequest(
                "unknown function",
                f"worker {self.worker_id} cannot import module {module!r} for {name}: {exc}. "
                "Make the module importable on the workers (same code, same sys.path)",
            ) from None
        except Exception:
            raise  # the module's own error: the caller gets its type and traceback
        except BaseException as exc:  # SystemExit and the like from the module's top level
            raise RefusedRequest(
                "import failed",
                f"importing {module!r} for {name} on worker {self.worker_id} raised "
                f"{type(exc).__name__}: {exc}",
            ) from None

    def _script_function(self, name: str) -> GridFunction[..., Any]:
        """A function of the client's script: load the script on first use."""
        if not self.main_path:
            raise RefusedRequest(
                "unknown function",
                f"{name} is defined in the caller's __main__, and worker {self.worker_id} was not "
                "given the caller's script (--main-path). Move the function into a module "
                "and start the worker with `--import MODULE`",
            )
        state = loading.load_main_script(self.main_path)
        gf = calls_mod.lookup(name)
        if gf is None:
            raise RefusedRequest("unknown function", state.explain_missing(name))
        return gf
