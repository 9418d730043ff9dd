"""Dataclasses that may cross the wire, each under a stable registered name:
decoding builds only classes registered here, so bytes never name arbitrary code.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

from ..errors import GridFunctionError

_BY_NAME: dict[str, type] = {}
_BY_CLASS: dict[type, str] = {}
_INIT_FIELDS: dict[type, tuple[str, ...]] = {}
_registry_lock = threading.Lock()

T = TypeVar("T", bound=type)


def _default_name(cls: type) -> str:
    # Worker processes load the user's script as ``__mp_main__`` (as multiprocessing's
    # spawn does), while the client ran it as ``__main__``: both must use one name.
    module = cls.__module__
    if module == "__mp_main__":
        module = "__main__"
    return f"{module}:{cls.__qualname__}"


@overload
def register(cls: T, /, *, name: str | None = None) -> T: ...
@overload
def register(cls: None = None, /, *, name: str | None = None) -> Callable[[T], T]: ...
def register(cls: Any = None, /, *, name: str | None = None) -> Any:
    """Let a ``@dataclass`` travel through the codec: ``@pygirder.register`` above it.

    Encoded instances carry the registered ``name`` (by default ``"module:QualName"``)
    and are rebuilt on decode by calling the class with its init fields, so the
    decoding process must have imported the module that registers the class.
    Registering the same class again is harmless; another class under a name already
    taken is an error, because decoding could no longer tell them apart.  A class
    defined in a script gets the module name ``__main__`` in every process, also in
    workers that load the script as ``__mp_main__``.
    """

    def decorate(klass: T) -> T:
        if not (isinstance(klass, type) and dataclasses.is_dataclass(klass)):
            what = getattr(klass, "__qualname__", repr(klass))
            raise GridFunctionError(
                f"cannot register {what}: only dataclasses can be registered with the codec; "
                "decorate the class with @dataclass (frozen or not) below @pygirder.register"
            )
        key = name if name is not None else _default_name(klass)
        with _registry_lock:
            existing = _BY_NAME.get(key)
            if existing is not None and existing is not klass:
                raise GridFunctionError(
                    f"cannot register {klass.__module__}.{klass.__qualname__} as {key!r}: that "
                    f"name is already taken by {existing.__module__}.{existing.__qualname__}; "
                    "pass another name with @pygirder.register(name=...)"
                )
            old_name = _BY_CLASS.get(klass)
            if old_name is not None and old_name != key:
                raise GridFunctionError(
                    f"cannot register {klass.__qualname__} as {key!r}: it is already "
                    f"registered as {old_name!r}; a class has one name on the grid"
                )
            _BY_NAME[key] = klass
            _BY_CLASS[klass] = key
            # Sorted: fields are encoded as a canonical (sorted) map.
            _INIT_FIELDS[klass] = tuple(sorted(f.name for f in dataclasses.fields(klass) if f.init))
        return klass

    if cls is None:
        return decorate
    return decorate(cls)
