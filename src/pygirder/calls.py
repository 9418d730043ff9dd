"""Grid functions: the @fn decorator, Call objects and the registry; the data model.

A call is named by its function's name, code fingerprint and bound arguments
(``pygirder.hashing``), so equal calls anywhere on the grid get equal ids.  This module
runs nothing and imports nothing from ``pygirder.grid``: ``call.result()`` and
``await call`` wait through the :class:`Waiter` that the grid registers with
:func:`register_waiter` when ``pygirder`` is imported.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Iterable
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from . import codec
from .errors import GridFunctionError
from .hashing import ID_LENGTH, ID_TAG, fingerprint, id_hasher

__all__ = [
    "ID_LENGTH",
    "ID_TAG",
    "Call",
    "GridFunction",
    "Waiter",
    "fingerprint",
    "fn",
    "lookup",
    "register_waiter",
    "registered_names",
]

P = ParamSpec("P")
R = TypeVar("R")

_REGISTRY: dict[str, GridFunction[..., Any]] = {}


class Waiter(Protocol):
    """How a call's result is waited for: in a worker's request, or in a client's grid.

    ``pygirder.grid.context`` implements it; the data model only needs these two.
    """

    def wait_sync(self, calls: Iterable[Any], timeout: float | None) -> list[Any]: ...

    async def gather_async(self, calls: Iterable[Any], timeout: float | None) -> list[Any]: ...


_waiter: Waiter | None = None


def register_waiter(waiter: Waiter) -> None:
    """Route ``call.result()`` and ``await call`` through ``waiter`` (the last one wins)."""
    global _waiter
    _waiter = waiter


def _the_waiter() -> Waiter:
    if _waiter is None:  # only if pygirder.grid failed to import
        raise GridFunctionError(
            "no grid runtime to wait on: `import pygirder` (which loads pygirder.grid) "
            "before waiting on a call"
        )
    return _waiter


def _module_name(module: str) -> str:
    # Local workers load the user's script as __mp_main__ (as multiprocessing's spawn
    # does, so its `if __name__ == "__main__":` block does not run); both names must
    # give the same qualified name and therefore the same request ids.
    return "__main__" if module == "__mp_main__" else module


def _check_definable(func: Callable[..., Any]) -> None:
    if not inspect.isfunction(func):
        raise GridFunctionError(
            f"@pygirder.fn takes a plain `def` function, got {type(func).__name__} {func!r}"
        )
    name = func.__qualname__
    if func.__name__ == "<lambda>":
        raise GridFunctionError(
            "a lambda cannot be a grid function: workers find functions by module and "
            "name. Define it with `def` at module level and decorate it with @pygirder.fn"
        )
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise GridFunctionError(
            f"{name} is a generator; a grid function must return a value. Return a list instead"
        )
    if "<locals>" in name or func.__closure__:
        raise GridFunctionError(
            f"{name} is defined inside another function (a closure); workers cannot import "
            "it. Move it to module level and pass what it captured as arguments"
        )


class GridFunction(Generic[P, R]):
    """A registered pure function.  Calling it builds a :class:`Call`; it never runs it."""

    def __init__(
        self,
        func: Callable[P, R],
        *,
        version: str | None = None,
        pool: str | None = None,
        timeout: float | None = None,
        max_runtime: float | None = None,
        cache_errors: bool = False,
    ) -> None:
        _check_definable(func)
        if max_runtime is not None and not (
            isinstance(max_runtime, int | float)
            and not isinstance(max_runtime, bool)
            and max_runtime > 0
        ):
            raise GridFunctionError(
                f"@pygirder.fn(max_runtime={max_runtime!r}) on {func.__qualname__}: give a "
                "number of seconds > 0, or None for the worker's default"
            )
        self.func = func
        self.name = f"{_module_name(func.__module__)}:{func.__qualname__}"
        self.is_async = inspect.iscoroutinefunction(func)
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        self._simple: tuple[tuple[str, ...], dict[str, Any]] | None = None
        if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            self._simple = (
                tuple(p.name for p in params),
                {p.name: p.default for p in params if p.default is not inspect.Parameter.empty},
            )
        self.version = version
        self.fingerprint = f"v:{version}" if version is not None else fingerprint(func)
        # (name, fingerprint, the encoded start of every payload): see Call.payload
        self._payload_head: tuple[str, str, bytes] | None = None
        # (name, fingerprint, the id hash over both, to be copied): see Call.id
        self._id_base: tuple[str, str, Any] | None = None
        self.pool = pool
        self.timeout = timeout
        self.max_runtime = max_runtime  # not part of the id: a limit does not change results
        # errors are kept in the durable store only when asked: most are transient
        self.cache_errors = bool(cache_errors)
        functools.update_wrapper(self, func)
        existing = _REGISTRY.get(self.name)
        if existing is not None and existing.fingerprint != self.fingerprint:
            # A module reloaded with new code: the newest definition wins, like Python's own.
            pass
        _REGISTRY[self.name] = self

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Call[R]:
        # not through options(): a closure per call is a measurable part of a large map
        return Call(self, self._bind(args, kwargs), pool=self.pool)

    def options(self, *, pool: str | None = None) -> Callable[P, Call[R]]:
        """Per-call overrides: ``price.options(pool="big")(1, 2)``."""

        def make(*args: P.args, **kwargs: P.kwargs) -> Call[R]:
            return Call(self, self._bind(args, kwargs), pool=pool or self.pool)

        return make

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Bound arguments with defaults applied, by name in signature order."""
        simple = self._simple
        if simple is not None and not kwargs and len(args) <= len(simple[0]):
            # fast path: positional arguments of a plain signature (the common case)
            names, defaults = simple
            arguments = dict(zip(names, args, strict=False))
            missing = names[len(args) :]
            if all(n in defaults for n in missing):
                for name in missing:
                    arguments[name] = defaults[name]
                return arguments
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise GridFunctionError(f"{self.name}{self._plain_signature()}: {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def _plain_signature(self) -> str:
        empty = inspect.Parameter.empty
        params = [p.replace(annotation=empty) for p in self.signature.parameters.values()]
        return str(self.signature.replace(parameters=params, return_annotation=empty))

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, in this process, without the grid (for tests and debugging)."""
        return self.func(*args, **kwargs)

    def bind_payload(self, arguments: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Turn decoded bound arguments back into ``(args, kwargs)`` for the real function."""
        simple = self._simple
        if simple is not None:
            names = simple[0]
            if tuple(arguments) == names:
                return tuple(arguments.values()), {}  # a plain signature: all positional
            # the encoding sorts the names, so decoded arguments of a plain signature
            # come in another order: put them back in the signature's
            if len(arguments) == len(names) and all(n in arguments for n in names):
                return tuple([arguments[n] for n in names]), {}
        bound = inspect.BoundArguments(self.signature, arguments)  # type: ignore[arg-type,unused-ignore]
        return bound.args, bound.kwargs

    def __repr__(self) -> str:
        return f"<grid function {self.name}>"

    def __reduce__(self) -> str:
        return self.func.__qualname__


@overload
def fn(func: Callable[P, R], /) -> GridFunction[P, R]: ...
@overload
def fn(
    *,
    version: str | None = None,
    pool: str | None = None,
    timeout: float | None = None,
    max_runtime: float | None = None,
    cache_errors: bool = False,
) -> Callable[[Callable[P, R]], GridFunction[P, R]]: ...
def fn(
    func: Callable[P, R] | None = None,
    /,
    *,
    version: str | None = None,
    pool: str | None = None,
    timeout: float | None = None,
    max_runtime: float | None = None,
    cache_errors: bool = False,
) -> Any:
    """Make a pure function a grid function: ``@pygirder.fn`` or ``@pygirder.fn(version="2")``.

    ``version`` replaces the code fingerprint (bump it when behaviour changes through
    something the bytecode does not show, such as a global constant); ``pool`` is the
    default pool for its calls; ``timeout`` the default time a caller waits.

    ``max_runtime`` bounds the seconds one call computes (time spent waiting on its
    sub-calls does not count), overriding the worker's ``--max-runtime``
    (``PYGIRDER_MAX_RUNTIME``).  A call over it fails with ``pygirder.MaxRuntimeExceeded``
    and is not retried; Python cannot stop a running thread, so the worker process
    running it hands back its other calls and restarts.  It does not change request ids.

    ``cache_errors=True`` keeps the function's errors in the durable result store too,
    so a rerun raises them again without computing; by default only results outlive the
    grid (an error may come from a passing condition: a full disk, a killed worker).
    """
    if func is not None:
        return GridFunction(func, version=version, pool=pool, timeout=timeout,
                            max_runtime=max_runtime, cache_errors=cache_errors)  # fmt: skip

    def decorate(f: Callable[P, R]) -> GridFunction[P, R]:
        return GridFunction(f, version=version, pool=pool, timeout=timeout,
                            max_runtime=max_runtime, cache_errors=cache_errors)  # fmt: skip

    return decorate


def lookup(name: str) -> GridFunction[..., Any] | None:
    return _REGISTRY.get(name)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


class Call(Generic[R]):
    """One application of a grid function to arguments; names a request by its ``id``.

    ``await call`` in async code, ``call.result()`` in sync code; both wait on the
    grid the caller runs in (a worker's, or the most recent ``pygirder.connect()``).
    """

    __slots__ = ("_args_bytes", "_id", "arguments", "function", "pool")

    def __init__(
        self, function: GridFunction[..., R], arguments: dict[str, Any], pool: str | None
    ) -> None:
        # pool None: the caller's pool (a worker's own pool, or the grid's default)
        self.function = function
        self.arguments = arguments
        self.pool = pool
        self._args_bytes: bytes | None = None
        self._id: str | None = None

    @property
    def args_bytes(self) -> bytes:
        if self._args_bytes is None:
            self._args_bytes = codec.encode(
                self.arguments,
                path=f"{self.function.name} arguments",
                limit=codec.DEFAULT_LIMITS["max_arg_bytes"],
            )
        return self._args_bytes

    @property
    def id(self) -> str:
        if self._id is None:
            fn = self.function
            base = fn._id_base
            if base is None or base[0] != fn.name or base[1] != fn.fingerprint:
                base = fn._id_base = (fn.name, fn.fingerprint, id_hasher(fn.name, fn.fingerprint))
            h = base[2].copy()
            h.update(self.args_bytes)
            self._id = h.hexdigest()
        return self._id

    def payload(self) -> bytes:
        """What a worker needs to run the call: name, fingerprint, encoded arguments.

        The msgpack array ``[name, fingerprint, args_bytes]``, joined from the
        function's encoded head and the arguments already encoded for the id: encoding
        the array again would walk and copy the arguments once more for every call.
        """
        fn = self.function
        head = fn._payload_head
        if head is None or head[0] != fn.name or head[1] != fn.fingerprint:
            encoded = codec.encode([fn.name, fn.fingerprint])
            head = fn._payload_head = (fn.name, fn.fingerprint, b"\x93" + encoded[1:])
        args = self.args_bytes
        size = len(args)
        if size < 0x100:
            mark = b"\xc4" + size.to_bytes(1, "big")
        elif size < 0x10000:
            mark = b"\xc5" + size.to_bytes(2, "big")
        else:
            mark = b"\xc6" + size.to_bytes(4, "big")
        return b"".join((head[2], mark, args))

    def result(self, timeout: float | None = None) -> R:
        result: R = _the_waiter().wait_sync([self], timeout)[0]
        return result

    def __await__(self) -> Generator[Any, None, R]:
        results = yield from _the_waiter().gather_async([self], None).__await__()
        result: R = results[0]
        return result

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}"[:40] for k, v in self.arguments.items())
        return f"<Call {self.function.name}({args})>"
