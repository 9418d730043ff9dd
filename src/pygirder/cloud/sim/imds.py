"""An EC2 instance metadata service (IMDSv2) emulator, for simulated instances and tests.

A simulated instance is a local process that runs the very user-data a real instance
gets; what it cannot have is the link-local metadata service at 169.254.169.254.  This
module serves the part of it pygirder uses, on 127.0.0.1 and a free port, with the
rules of IMDSv2 with tokens *required*:

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600``
  returns a session token (400 without a valid TTL header, 403 when the request
  carries ``X-Forwarded-For``, as AWS does to stop proxies from fetching tokens);
- every ``GET`` needs ``X-aws-ec2-metadata-token`` with a live token, else 401;
- an unknown path is 404, a directory (``/latest/meta-data/``) lists its entries.

Served: ``/latest/user-data`` and, under ``/latest/meta-data/``, ``instance-id``,
``ami-id``, ``instance-type``, ``instance-life-cycle``, ``local-ipv4``,
``public-hostname`` and ``public-ipv4`` (404 when the instance has none),
``placement/availability-zone``, ``placement/region``, ``tags/instance/<key>``,
``spot/instance-action`` and ``spot/termination-time`` (404 until
:meth:`ImdsEmulator.raise_spot_interruption`), and
``events/recommendations/rebalance`` (404 until
:meth:`ImdsEmulator.recommend_rebalance`; then ``{"noticeTime": ...}`` as on EC2).

A process reaches it through the environment returned by :meth:`ImdsEmulator.env`:
``PYGIRDER_IMDS_ENDPOINT`` for the pygirder agent and
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` for boto3.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MAX_TOKEN_TTL_S", "ImdsEmulator"]

# IMDSv2 accepts token lifetimes from one second to six hours.
MAX_TOKEN_TTL_S = 21600


class _Handler(BaseHTTPRequestHandler):
    server: _ImdsHttpServer
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read stderr
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def do_PUT(self) -> None:
        self._drain()
        emulator = self.server.emulator
        if self.path.rstrip("/") != "/latest/api/token":
            self._send(404, b"Not Found")
            return
        if self.headers.get("X-Forwarded-For"):
            self._send(403, b"Forbidden")
            return
        raw = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        try:
            ttl = int(raw)
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TOKEN_TTL_S:
            self._send(400, b"Bad Request")
            return
        token = emulator._issue_token(ttl)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(token)))
        self.send_header("X-aws-ec2-metadata-token-ttl-seconds", str(ttl))
        self.end_headers()
        self.wfile.write(token.encode())

    def do_GET(self) -> None:
        self._drain()
        emulator = self.server.emulator
        if not emulator._token_valid(self.headers.get("X-aws-ec2-metadata-token", "")):
            self._send(401, b"Unauthorized")
            return
        emulator._count_get()
        status, body, content_type = emulator._lookup(self.path.split("?", 1)[0])
        self._send(status, body, content_type)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._drain()
        self._send(405, b"Method Not Allowed")

    do_DELETE = do_POST


class _ImdsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: ImdsEmulator) -> None:
        self.emulator = emulator
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (its timeout, on a loaded machine) is not news: the
        agent asks again; socketserver would print a traceback for each."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ImdsEmulator:
    """IMDSv2 for one simulated instance; a context manager, or ``start()``/``stop()``.

    Everything but the user-data and the tags has a plausible default, so
    ``ImdsEmulator(user_data=script)`` is enough for most tests.  ``lifecycle`` is
    ``"spot"`` or ``"on-demand"``.  ``public_hostname=None`` means no public address
    (a private-subnet instance): those paths answer 404 as on EC2.
    """

    def __init__(
        self,
        *,
        instance_id: str = "i-0123456789abcdef0",
        user_data: bytes | str | None = None,
        local_ipv4: str = "127.0.0.1",
        public_hostname: str | None = None,
        public_ipv4: str | None = None,
        availability_zone: str = "us-east-1a",
        instance_type: str = "t3.micro",
        lifecycle: str = "spot",
        ami_id: str = "ami-0123456789abcdef0",
        tags: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if lifecycle not in ("spot", "on-demand"):
            raise ValueError(f"lifecycle must be 'spot' or 'on-demand', not {lifecycle!r}")
        if isinstance(user_data, str):
            user_data = user_data.encode()
        self.instance_id = instance_id
        self.user_data = user_data
        self.local_ipv4 = local_ipv4
        self.public_hostname = public_hostname
        self.public_ipv4 = public_ipv4
        self.availability_zone = availability_zone
        self.instance_type = instance_type
        self.lifecycle = lifecycle
        self.ami_id = ami_id
        self.tags = dict(tags or {})
        self.host = host
        self.port = port
        self.get_count = 0
        self._spot_action: dict[str, str] | None = None
        self._rebalance: str | None = None
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server: _ImdsHttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("the IMDS emulator is not running: call start() first")
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point the agent and boto3 at this emulator."""
        return {
            "PYGIRDER_IMDS_ENDPOINT": self.url,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.url + "/",
        }

    def start(self) -> ImdsEmulator:
        if self._server is not None:
            return self
        self._server = _ImdsHttpServer((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"imds-{self.instance_id}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> ImdsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- events ----------------------------------------------------------------
    def raise_spot_interruption(self, action: str = "terminate", in_seconds: float = 120) -> str:
        """Post a spot interruption notice; returns the announced time (ISO, UTC)."""
        if action not in ("terminate", "stop", "hibernate"):
            raise ValueError(f"action must be terminate, stop or hibernate, not {action!r}")
        when = datetime.now(UTC) + timedelta(seconds=in_seconds)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            self._spot_action = {"action": action, "time": stamp}
        return stamp

    def clear_spot_interruption(self) -> None:
        """Forget the notice and any rebalance recommendation (the instance booted again)."""
        with self._lock:
            self._spot_action = None
            self._rebalance = None

    def recommend_rebalance(self) -> str:
        """Post a rebalance recommendation (elevated risk of interruption); returns its
        time (ISO, UTC).  EC2 keeps the first one, so a second call changes nothing."""
        with self._lock:
            if self._rebalance is None:
                self._rebalance = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return self._rebalance

    def revoke_tokens(self) -> None:
        """Invalidate every issued token, as if they had all expired."""
        with self._lock:
            self._tokens.clear()

    # -- request handling (called from server threads) ---------------------------
    def _issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(40)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token

    def _token_valid(self, token: str) -> bool:
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def _count_get(self) -> None:
        with self._lock:
            self.get_count += 1

    def _tree(self) -> dict[str, object]:
        """The metadata as nested dicts; leaves are strings, absent values are left out."""
        meta: dict[str, object] = {
            "ami-id": self.ami_id,
            "instance-id": self.instance_id,
            "instance-type": self.instance_type,
            "instance-life-cycle": self.lifecycle,
            "local-ipv4": self.local_ipv4,
            "local-hostname": f"ip-{self.local_ipv4.replace('.', '-')}.ec2.internal",
            "placement": {
                "availability-zone": self.availability_zone,
                "region": self.availability_zone.rstrip("abcdefghijklmnopqrstuvwxyz"),
            },
        }
        if self.public_hostname:
            meta["public-hostname"] = self.public_hostname
        if self.public_ipv4:
            meta["public-ipv4"] = self.public_ipv4
        if self.tags:
            meta["tags"] = {"instance": dict(self.tags)}
        with self._lock:
            spot = dict(self._spot_action) if self._spot_action else None
            rebalance = self._rebalance
        if spot:
            meta["spot"] = {"instance-action": json.dumps(spot), "termination-time": spot["time"]}
        if rebalance:
            notice = json.dumps({"noticeTime": rebalance})
            meta["events"] = {"recommendations": {"rebalance": notice}}
        return {"meta-data": meta}

    def _lookup(self, path: str) -> tuple[int, bytes, str]:
        if path.rstrip("/") == "/latest/user-data":
            if self.user_data is None:
                return 404, b"Not Found", "text/plain"
            return 200, self.user_data, "application/octet-stream"
        if not path.startswith("/latest/"):
            return 404, b"Not Found", "text/plain"
        node: object = self._tree()
        for part in [p for p in path[len("/latest/") :].split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                return 404, b"Not Found", "text/plain"
            node = node[part]
        if isinstance(node, dict):
            listing = [k + "/" if isinstance(v, dict) else k for k, v in sorted(node.items())]
            return 200, "\n".join(listing).encode(), "text/plain"
        json_leaf = path.rstrip("/").endswith(("instance-action", "recommendations/rebalance"))
        content_type = "application/json" if json_leaf else "text/plain"
        return 200, str(node).encode(), content_type
