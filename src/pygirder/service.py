"""Turn a plain function into a service command with the options every pygirder process shares.

It lives outside :mod:`pygirder.cli` because more than the ``pygirder`` command runs
through it: the agent on a cloud instance is a service command too, and code that
runs on an instance depends on nothing of the operator's command line.

Every long-running pygirder process (server, worker, distributor, the cloud agent) and
every user service is started by a controller that needs the same things from it: a
log level, an identity that shows up in every log record, options from a JSON/TOML
document, a way to keep the process up after its work is done, and, with ``--json``,
one machine-readable envelope on stdout saying what happened::

    {"result": ..., "error": null | {"type", "message", "traceback"},
     "time_s": 0.12, "id": "host:1234", "log": [{"time", "level", "logger", "message", "id"}, ...]}

Usage::

    import typer
    from pygirder.service import ServiceContext, service

    app = typer.Typer()

    @service(app)                       # or @service(app, name="worker", stop="flag")
    def worker(ctx: ServiceContext, pool: str = "default", processes: int = 1) -> dict:
        ctx.log.info("starting %d processes in pool %s", processes, pool)
        return {"ok": True}

    if __name__ == "__main__":
        app()

The function's own parameters become Typer options as usual; the decorator adds
``--log-level``, ``--id``, ``--hang SECONDS``, ``--opts JSON|TOML|@file`` and ``--json``
and passes a :class:`ServiceContext` to the parameter annotated with it (if any).

The envelope (or, without ``--json``, the plain result, or a one-line error on
stderr) is printed as soon as the function returns; ``--hang`` waits after that, so
a controller reads the outcome while the process stays up.  ``time_s`` times the
function alone.  Log records at ``--log-level`` and above go to stderr while the
command runs and, with ``--json``, into the envelope's ``log``; each carries the
``--id`` (``record.service_id``).  ``ctx.log`` is the logger named after the command.

Precedence of values: the function's defaults < ``--opts`` < options given on the
command line (or through an ``envvar=`` of the option).  ``--opts`` may also carry
``log_level``, ``id`` and ``hang``.  Parameters without a default stay required
command-line arguments.

Exit codes: 0 success (also a clean stop by SIGTERM/SIGINT), 1 the function raised,
2 bad options (unparsable or unknown ``--opts``, a wrong type, a bad command line, or
a ``typer.BadParameter`` the function raised after checking its own arguments).
With ``--json`` each of these prints exactly one envelope, even for bad options; the
envelope of a bad option carries no traceback, since the fix is in the command line.

Without ``--json`` the result goes through ``render`` (``service(app, render=...)``):
by default scalars print as they are and anything else pretty-printed, so a command
with its own human output (a table, a JSON line) passes a function that prints it.

Stopping: SIGTERM and SIGINT set ``ctx.stopping`` (a ``threading.Event``).  With the
default ``stop="interrupt"`` they also interrupt the function, like Ctrl-C: a sync
function gets ``KeyboardInterrupt``, an async one is cancelled (``CancelledError`` at its
``await``).  A function may catch that to clean up and return a value; if it lets it
escape, the command still ends cleanly (result null, exit 0).  With ``stop="flag"``
the first signal only sets ``ctx.stopping`` (for loops that check it and drain their
work) and a second signal interrupts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import tomllib
import traceback
import typing
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from typer.core import TyperCommand

from .errors import ConfigError

try:  # typer >= 0.20 ships its own copy of click
    from typer._click.exceptions import UsageError as _UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import UsageError as _UsageError  # type: ignore[assignment]

__all__ = ["LOG_LEVELS", "ServiceContext", "default_service_id", "load_options", "service"]

F = TypeVar("F", bound=Callable[..., Any])

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LogLevel(enum.StrEnum):
    """The choices of ``--log-level`` (case-insensitive on the command line)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


# The envelope keeps at most this many log records (the latest), so a service that
# ran for days still prints an envelope a controller can parse.
ENVELOPE_LOG_LIMIT = 1000
# Exit codes (documented in the module docstring).
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# Names of the shared options, as Python identifiers, and the options --opts may set.
_RESERVED = ("log_level", "id", "hang", "opts", "json")
_FROM_OPTS = ("log_level", "id", "hang")
# Wrapper parameters carry a prefix so they can never collide with the function's.
_P = "_pg_svc_"
_PANEL = "Service options"


def default_service_id() -> str:
    """``<hostname>:<pid>``: unique enough on a grid, and says where to look."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class ServiceContext:
    """What a service function gets besides its own options.

    ``opts`` holds the effective value of every parameter of the function after
    defaults, ``--opts`` and the command line were merged.  ``stopping`` is set when
    SIGTERM or SIGINT arrives; ``stop_signal`` then names it.
    """

    id: str
    name: str
    log: logging.Logger
    opts: dict[str, Any]
    log_level: str = "INFO"
    json: bool = False
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    stop_signal: str | None = None


# -- --opts ---------------------------------------------------------------------------


def load_options(text: str) -> dict[str, Any]:
    """Parse an ``--opts`` value: a JSON object, a TOML document, or ``@path`` to either.

    A file is read as TOML or JSON by its extension; anything else is sniffed (a JSON
    object starts with ``{``, which no TOML document does).  Raises ConfigError.
    """
    where = "--opts"
    suffix = ""
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        where = f"--opts file {str(path)!r}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
        suffix = path.suffix.lower()
    if not text.strip():
        return {}
    head = text.lstrip()[:1]
    if suffix == ".json" or (suffix != ".toml" and head == "{"):
        kind = "JSON"
    elif suffix != ".toml" and head == "[" and _is_json(text):
        kind = "JSON"  # a JSON array, not a TOML table header: reported below
    else:
        kind = "TOML"
    try:
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError is a ValueError too
        raise ConfigError(f"{where} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object or TOML table, not {type(data).__name__}")
    return data


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _plain_annotation(annotation: Any) -> Any:
    """The annotation without Typer's metadata, for validating values from --opts."""
    if annotation is inspect.Parameter.empty:
        return Any
    if typing.get_origin(annotation) is Annotated:
        base, *meta = typing.get_args(annotation)
        meta = [m for m in meta if not isinstance(m, typer.models.ParameterInfo)]
        return Annotated[(base, *meta)] if meta else base
    return annotation


class _Validator:
    """Checks and converts one --opts value to a parameter's type (pydantic, lax mode)."""

    def __init__(self, annotation: Any) -> None:
        self.annotation = _plain_annotation(annotation)
        self._adapter: Any = None

    def __call__(self, value: Any) -> Any:
        from pydantic import TypeAdapter, ValidationError

        if self._adapter is None:
            try:
                self._adapter = TypeAdapter(self.annotation)
            except Exception:  # a type pydantic cannot describe: accept the value as is
                self._adapter = False
        if self._adapter is False:
            return value
        try:
            return self._adapter.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{first['msg']} (expected {_type_name(self.annotation)})") from None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _level_validator(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _id_validator(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _hang_validator(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError("expected a number of seconds >= 0")
    return float(value)


_COMMON_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "log_level": _level_validator,
    "id": _id_validator,
    "hang": _hang_validator,
}


# -- the function's description ---------------------------------------------------------


@dataclasses.dataclass
class _Spec:
    """What the decorator learnt about the function, once, at decoration time."""

    fn: Callable[..., Any]
    name: str
    stop: str
    ctx_param: str | None
    params: list[inspect.Parameter]  # the function's parameters minus the context
    validators: dict[str, _Validator]
    is_async: bool
    render: Callable[[Any], None] | None = None

    @classmethod
    def inspect(
        cls,
        fn: Callable[..., Any],
        name: str,
        stop: str,
        render: Callable[[Any], None] | None = None,
    ) -> _Spec:
        hints = typing.get_type_hints(fn, include_extras=True)
        ctx_param = None
        params: list[inspect.Parameter] = []
        validators: dict[str, _Validator] = {}
        for p in inspect.signature(fn).parameters.values():
            annotation = hints.get(p.name, p.annotation)
            if annotation is ServiceContext:
                ctx_param = p.name
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(f"service {name!r}: *{p.name} parameters cannot be options")
            if p.name in _RESERVED:
                raise ConfigError(
                    f"service {name!r}: parameter {p.name!r} clashes with the shared option "
                    f"--{p.name.replace('_', '-')}; rename it (reserved: {', '.join(_RESERVED)})"
                )
            params.append(p.replace(annotation=annotation))
            if not (isinstance(annotation, type) and issubclass(annotation, typer.Context)):
                validators[p.name] = _Validator(annotation)
        return cls(
            fn=fn,
            name=name,
            stop=stop,
            ctx_param=ctx_param,
            params=params,
            validators=validators,
            is_async=inspect.iscoroutinefunction(fn),
            render=render,
        )

    def apply_opts(
        self, raw: dict[str, Any], values: dict[str, Any], common: dict[str, Any], explicit: set
    ) -> None:
        """Merge --opts into ``values``/``common`` in place, except explicit options."""
        problems = []
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name in self.validators:
                check: Callable[[Any], Any] = self.validators[name]
                target = values
            elif name in _FROM_OPTS:
                check, target = _COMMON_VALIDATORS[name], common
            else:
                known = ", ".join(sorted([*self.validators, *_FROM_OPTS]))
                problems.append(f"unknown option {key!r} (known: {known})")
                continue
            try:
                converted = check(value)
            except ValueError as exc:
                problems.append(f"{key} = {value!r}: {exc}")
                continue
            if name not in explicit:
                target[name] = converted
        if problems:
            raise ConfigError("bad --opts: " + "; ".join(problems))


# -- logging while the command runs ------------------------------------------------------


class _StampId(logging.Filter):
    """Puts the service id on every record our handlers see (``record.service_id``)."""

    def __init__(self, service_id: str) -> None:
        super().__init__()
        self.service_id = service_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "service_id"):
            record.service_id = self.service_id
        return True


class _Capture(logging.Handler):
    """Keeps the records of one run, as plain dicts, for the envelope."""

    def __init__(self, level: int, limit: int = ENVELOPE_LOG_LIMIT) -> None:
        super().__init__(level)
        self.records: deque[dict[str, Any]] = deque(maxlen=limit)
        self.seen = 0
        self.closed_for_capture = False
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        if self.closed_for_capture:
            return
        try:
            entry: dict[str, Any] = {
                "time": round(record.created, 6),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                "id": getattr(record, "service_id", ""),
            }
            if record.exc_info:
                entry["exc"] = self._formatter.formatException(record.exc_info)
            self.seen += 1
            self.records.append(entry)
        except Exception:  # never let logging break the service
            self.handleError(record)

    def snapshot(self) -> list[dict[str, Any]]:
        self.closed_for_capture = True
        out = list(self.records)
        dropped = self.seen - len(out)
        if dropped > 0:
            first = out[0]
            out.insert(
                0,
                {
                    **first,
                    "level": "WARNING",
                    "logger": "pygirder.service",
                    "message": f"{dropped} earlier log records dropped from the envelope",
                },
            )
            out[0].pop("exc", None)
        return out


class _Logging:
    """Installs the stderr and capture handlers on the root logger for one run."""

    def __init__(self, service_id: str, level: str) -> None:
        self.level = getattr(logging, level)
        stamp = _StampId(service_id)
        self.capture = _Capture(self.level)
        self.capture.addFilter(stamp)
        self.stderr = logging.StreamHandler(sys.stderr)
        self.stderr.setLevel(self.level)
        self.stderr.addFilter(stamp)
        self.stderr.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s [%(service_id)s] %(name)s: %(message)s")
        )
        self._saved_level: int | None = None

    def __enter__(self) -> _Logging:
        root = logging.getLogger()
        self._saved_level = root.level
        root.setLevel(self.level)
        root.addHandler(self.capture)
        root.addHandler(self.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.capture)
        root.removeHandler(self.stderr)
        if self._saved_level is not None:
            root.setLevel(self._saved_level)


# -- signals ------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT handling for one run: set ``ctx.stopping``, maybe interrupt."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, ctx: ServiceContext, stop: str) -> None:
        self.ctx = ctx
        self.stop = stop
        self.phase = "idle"  # "sync" / "async" while the function runs
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        # No logging here: a signal handler may run while the logging lock is held.
        repeated = self.ctx.stopping.is_set()
        self.ctx.stop_signal = signal.Signals(signum).name
        self.ctx.stopping.set()
        if self.stop == "flag" and not repeated:
            return
        if self.phase == "sync":
            raise KeyboardInterrupt
        if self.phase == "async" and self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


# -- running one command --------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """JSON fallback for results: models, dataclasses, sets, paths; else repr."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def _error(exc: BaseException, with_traceback: bool = True) -> dict[str, str]:
    tb = "".join(traceback.format_exception(exc)) if with_traceback else ""
    return {"type": type(exc).__name__, "message": str(exc), "traceback": tb}


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _print_envelope(envelope: dict[str, Any]) -> None:
    try:
        line = json.dumps(envelope, default=_jsonable)
    except (TypeError, ValueError) as exc:
        envelope = {
            **envelope,
            "result": None,
            "error": _error(TypeError(f"result cannot be encoded as JSON: {exc}"), False),
        }
        line = json.dumps(envelope, default=repr)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _print_result(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, str | int | float | bool):
        sys.stdout.write(f"{result}\n")
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.pretty import Pretty

    Console(file=sys.stdout, soft_wrap=True).print(Pretty(result))


def _hang(seconds: float, ctx: ServiceContext) -> None:
    """Stay alive ``seconds`` (``inf``: until a signal), ending early on SIGTERM/SIGINT."""
    deadline = time.monotonic() + seconds
    while not ctx.stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _find_service_id(args: list[str]) -> str:
    """``--id`` from a raw command line that failed to parse, for the envelope."""
    for i, arg in enumerate(args):
        if arg == "--id" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--id="):
            return arg[5:]
    return default_service_id()


class _ServiceCommand(TyperCommand):
    """A Typer command that still prints one envelope when ``--json`` is on the
    command line and the command line itself cannot be parsed."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        raw = list(args)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _UsageError as exc:
            options = raw[: raw.index("--")] if "--" in raw else raw
            if "--json" not in options:
                raise
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            err = {"type": type(exc).__name__, "message": message, "traceback": ""}
            _print_envelope(
                {
                    "result": None,
                    "error": err,
                    "time_s": 0.0,
                    "id": _find_service_id(raw),
                    "log": [],
                }
            )
            raise typer.Exit(EXIT_USAGE) from None


def _run(spec: _Spec, kwargs: dict[str, Any]) -> int:
    """Run the function once with the shared options; returns the exit code."""
    click_ctx = kwargs.pop(_P + "click_ctx")
    common = {name: kwargs.pop(_P + name) for name in _RESERVED}
    explicit = set()
    for p in click_ctx.command.params:
        source = click_ctx.get_parameter_source(p.name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            explicit.add(p.name[len(_P) :] if p.name.startswith(_P) else p.name)
    json_mode = bool(common.pop("json"))
    opts_text = common.pop("opts")
    common["log_level"] = LogLevel(common["log_level"]).value
    started = time.perf_counter()

    def finish(result: Any, error: dict[str, str] | None, sid: str, log: list) -> None:
        if json_mode:
            elapsed = round(time.perf_counter() - started, 6)
            _print_envelope(
                {"result": result, "error": error, "time_s": elapsed, "id": sid, "log": log}
            )

    values = dict(kwargs)
    try:
        if opts_text is not None:
            spec.apply_opts(load_options(opts_text), values, common, explicit)
        if common["hang"] < 0:
            raise ConfigError(f"--hang must be >= 0 seconds, got {common['hang']}")
    except ConfigError as exc:
        sid = common["id"] or default_service_id()
        finish(None, _error(exc, False), sid, [])
        if not json_mode:
            typer.echo(f"error: {_one_line(str(exc))}", err=True)
        return EXIT_USAGE

    sid = common["id"] or default_service_id()
    ctx = ServiceContext(
        id=sid,
        name=spec.name,
        log=logging.getLogger(spec.name),
        opts=dict(values),
        log_level=common["log_level"],
        json=json_mode,
    )
    call_kwargs = dict(values)
    if spec.ctx_param is not None:
        call_kwargs[spec.ctx_param] = ctx

    result: Any = None
    failure: BaseException | None = None
    code = EXIT_OK
    with _Signals(ctx, spec.stop) as signals, _Logging(sid, common["log_level"]) as logs:
        try:
            if spec.is_async:
                result = asyncio.run(_run_async(spec, call_kwargs, signals))
            else:
                signals.phase = "sync"
                try:
                    if spec.stop == "interrupt" and ctx.stopping.is_set():
                        raise KeyboardInterrupt  # the signal came before the call
                    result = spec.fn(**call_kwargs)
                finally:
                    signals.phase = "idle"
        except (KeyboardInterrupt, asyncio.CancelledError):
            result = None
            ctx.log.info("stopped by %s", ctx.stop_signal or "interrupt")
        except _UsageError as exc:  # the function found its arguments wrong
            failure = exc
            code = EXIT_USAGE
        except (SystemExit, typer.Exit) as exc:
            status = exc.code if isinstance(exc, SystemExit) else exc.exit_code
            if status not in (0, None):
                failure = exc
                code = status if isinstance(status, int) else EXIT_ERROR
        except Exception as exc:
            failure = exc
            code = EXIT_ERROR
        else:
            if ctx.stopping.is_set():
                ctx.log.info("stopped by %s", ctx.stop_signal)
        records = logs.capture.snapshot()
        usage = isinstance(failure, _UsageError)
        error = _error(failure, not usage) if failure is not None else None
        if usage:
            error = {**error, "message": failure.format_message()}  # type: ignore[union-attr,dict-item]
        finish(result, error, sid, records)
        if not json_mode:
            if failure is None:
                (spec.render or _print_result)(result)
            elif isinstance(failure, SystemExit | typer.Exit):
                pass  # the function said what went wrong before it exited
            elif usage:
                typer.echo(
                    f"error: {failure.format_message()}\n"  # type: ignore[attr-defined]
                    f"Try '{click_ctx.command_path} --help' for help.",
                    err=True,
                )
            else:
                if common["log_level"] == "DEBUG":
                    traceback.print_exception(failure, file=sys.stderr)
                message = _one_line(str(failure))
                typer.echo(f"error: {type(failure).__name__}: {message}", err=True)
        if common["hang"] > 0:
            _hang(common["hang"], ctx)
    return code


async def _run_async(spec: _Spec, kwargs: dict[str, Any], signals: _Signals) -> Any:
    signals.loop = asyncio.get_running_loop()
    signals.task = asyncio.current_task()
    signals.phase = "async"
    try:
        if signals.stop == "interrupt" and signals.ctx.stopping.is_set():
            raise asyncio.CancelledError
        return await spec.fn(**kwargs)
    finally:
        signals.phase = "idle"


def _callback(spec: _Spec) -> Callable[..., None]:
    """The function Typer sees: the service's parameters plus the shared options."""

    def callback(**kwargs: Any) -> None:
        code = _run(spec, kwargs)
        if code:
            raise typer.Exit(code)

    shared = [
        (
            "click_ctx",
            typer.Context,
            inspect.Parameter.empty,
        ),
        (
            "log_level",
            Annotated[
                LogLevel,
                typer.Option(
                    "--log-level",
                    case_sensitive=False,
                    help=f"Log level: {', '.join(LOG_LEVELS)}.",
                    rich_help_panel=_PANEL,
                ),
            ],
            LogLevel.INFO,
        ),
        (
            "id",
            Annotated[
                str | None,
                typer.Option(
                    "--id",
                    help="Identifier in the envelope and every log record (default: host:pid).",
                    rich_help_panel=_PANEL,
                ),
            ],
            None,
        ),
        (
            "hang",
            Annotated[
                float,
                typer.Option(
                    "--hang",
                    metavar="SECONDS",
                    help="Stay alive this long after the function returns (inf: until SIGTERM).",
                    rich_help_panel=_PANEL,
                ),
            ],
            0.0,
        ),
        (
            "opts",
            Annotated[
                str | None,
                typer.Option(
                    "--opts",
                    metavar="JSON|TOML|@FILE",
                    help="Option values as JSON or TOML, or @path to a .json/.toml file; "
                    "options given on the command line win.",
                    rich_help_panel=_PANEL,
                ),
            ],
            None,
        ),
        (
            "json",
            Annotated[
                bool,
                typer.Option(
                    "--json",
                    help='Print one JSON envelope {"result", "error", "time_s", "id", "log"}.',
                    rich_help_panel=_PANEL,
                ),
            ],
            False,
        ),
    ]
    params = list(spec.params)
    for name, annotation, default in shared:
        params.append(
            inspect.Parameter(
                _P + name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
        )
    params = sorted(params, key=lambda p: p.kind)  # keyword-only after the function's own
    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__name__ = spec.fn.__name__
    callback.__qualname__ = spec.fn.__qualname__
    callback.__doc__ = spec.fn.__doc__
    callback.__module__ = spec.fn.__module__
    return callback


def service(
    app: typer.Typer,
    *,
    name: str | None = None,
    stop: Literal["interrupt", "flag"] = "interrupt",
    render: Callable[[Any], None] | None = None,
    **command_kwargs: Any,
) -> Callable[[F], F]:
    """Register ``fn`` as a command of ``app`` with the shared service options.

    ``name`` defaults to the function's name (underscores become dashes, as in
    Typer).  ``stop`` chooses what SIGTERM/SIGINT do (module docstring).  ``render``
    prints a successful result without ``--json`` (default: plain or pretty).  Other
    keyword arguments go to ``app.command()`` (``help=``, ``hidden=``...).  The
    function is returned unchanged, so it stays callable from Python.
    """
    if stop not in ("interrupt", "flag"):
        raise ConfigError(f"service(stop={stop!r}): expected 'interrupt' or 'flag'")

    def decorate(fn: F) -> F:
        cmd_name = name or fn.__name__.replace("_", "-")
        spec = _Spec.inspect(fn, cmd_name, stop, render)
        callback = _callback(spec)
        app.command(name, cls=_ServiceCommand, **command_kwargs)(callback)
        return fn

    return decorate
