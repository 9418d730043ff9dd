"""IMDSv2: the instance's own metadata, read with a session token renewed on 401."""

from __future__ import annotations

import json
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import AgentError
from .common import _backoff, imds_endpoint


# -- IMDSv2 ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceMetadata:
    """What the agent knows about its instance, read once from IMDS."""

    instance_id: str
    private_ip: str
    public_hostname: str | None
    zone: str
    region: str
    instance_type: str
    lifecycle: str
    ami_id: str


class ImdsClient:
    """A small IMDSv2 client: token first, renewed on 401; connection errors retried."""

    TOKEN_TTL_S = 21600

    def __init__(
        self, endpoint: str | None = None, *, timeout: float = 2.0, attempts: int = 5
    ) -> None:
        self.endpoint = (endpoint or imds_endpoint()).rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self._token: str | None = None
        self._lock = threading.Lock()

    def _request(self, method: str, path: str, headers: Mapping[str, str]) -> bytes | None:
        req = urllib.request.Request(self.endpoint + path, method=method, headers=dict(headers))
        # IMDS is link-local: never go through a proxy, whatever the environment says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 404:
                return None
            raise

    def token(self, refresh: bool = False) -> str:
        with self._lock:
            if self._token is None or refresh:
                body = self._request(
                    "PUT",
                    "/latest/api/token",
                    {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
                )
                if not body:
                    raise AgentError(f"IMDS at {self.endpoint} returned no session token")
                self._token = body.decode()
            return self._token

    def _get_once(self, path: str, token: str) -> bytes | None:
        try:
            return self._request("GET", f"/latest/{path}", {"X-aws-ec2-metadata-token": token})
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise _Unauthorized(str(exc)) from exc
            raise

    def get(self, path: str) -> str | None:
        """GET ``/latest/<path>``: the text, or None when IMDS says 404.

        A 401 (expired token) gets a new token and one more try; connection errors and
        5xx are retried with backoff; anything else is an :class:`AgentError`.
        """
        path = path.lstrip("/")
        last: Exception | None = None
        refresh = False
        for attempt in range(1, self.attempts + 1):
            try:
                body = self._get_once(path, self.token(refresh=refresh))
                return None if body is None else body.decode()
            except _Unauthorized as exc:
                last, refresh = exc, True
                continue
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    last = exc
                    break
                last = exc
            except OSError as exc:  # URLError, timeouts, connection refused
                last = exc
            if attempt < self.attempts:
                time.sleep(_backoff(attempt, base=0.2, cap=2.0))
        raise AgentError(
            f"cannot read {path} from the instance metadata service at {self.endpoint}: {last}"
            " (on EC2 check that IMDS is enabled; a simulation must set PYGIRDER_IMDS_ENDPOINT)"
        )

    def require(self, path: str) -> str:
        value = self.get(path)
        if value is None:
            raise AgentError(f"the instance metadata service has no {path}")
        return value

    def metadata(self) -> InstanceMetadata:
        zone = self.require("meta-data/placement/availability-zone")
        return InstanceMetadata(
            instance_id=self.require("meta-data/instance-id"),
            private_ip=self.require("meta-data/local-ipv4"),
            public_hostname=self.get("meta-data/public-hostname") or None,
            zone=zone,
            region=self.get("meta-data/placement/region") or zone.rstrip(string.ascii_lowercase),
            instance_type=self.require("meta-data/instance-type"),
            lifecycle=self.get("meta-data/instance-life-cycle") or "on-demand",
            ami_id=self.get("meta-data/ami-id") or "",
        )

    def spot_action(self) -> dict[str, str] | None:
        """The pending spot interruption notice, or None."""
        body = self.get("meta-data/spot/instance-action")
        if body is None:
            return None
        try:
            notice = json.loads(body)
        except ValueError:
            notice = {"action": "unknown", "time": body.strip()}
        return {"action": str(notice.get("action", "")), "time": str(notice.get("time", ""))}

    def rebalance_recommendation(self) -> str | None:
        """When EC2 recommended rebalancing this spot instance (ISO time), or None.

        The signal (``{"noticeTime": ...}``) says the instance is at elevated risk of
        interruption; it often comes well before the two-minute notice, and it stays.
        """
        body = self.get("meta-data/events/recommendations/rebalance")
        if body is None:
            return None
        try:
            notice = json.loads(body)
        except ValueError:
            return body.strip() or "an unknown time"
        when = notice.get("noticeTime") if isinstance(notice, dict) else None
        return str(when) if when else "an unknown time"


class _Unauthorized(Exception):
    pass
