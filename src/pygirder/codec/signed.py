"""Signed pickle: an opt-in transport for grids whose members share a secret.

Every message carries an HMAC over its body and the request it belongs to, so a
message altered, signed with another secret or replayed for another request is
refused before ``pickle.loads`` sees it.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any

from ..errors import CodecError, ConfigError
from .codecs import Codec
from .encoding import _check_limit, _type_name


class PickleCodec(Codec):
    """Opt-in pickle transport for grids whose members share a secret.

    Pickle runs arbitrary code when it loads, so every message is signed with
    HMAC-SHA256 under the shared secret and the signature is checked (in constant
    time) *before* anything is unpickled.  The signature also covers ``context`` (the
    request id of a result), so a signed message is refused when it is presented as
    another request's.  Pickle output is not canonical, so this codec carries payloads
    and results only: request ids are always computed from the msgpack encoding of
    the arguments.
    """

    name = "pickle"
    _MAGIC = b"PGP1"
    _TAG_LEN = hashlib.sha256().digest_size
    MIN_SECRET_BYTES = 32

    def __init__(self, secret: bytes | str) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, bytes) or not secret:
            raise ConfigError(
                "PickleCodec secret: must be a non-empty str or bytes shared by every member "
                "of the grid (e.g. from the PYGIRDER_SECRET environment variable)"
            )
        if len(secret) < self.MIN_SECRET_BYTES:
            raise ConfigError(
                f"the pickle secret (PYGIRDER_SECRET) is {len(secret)} bytes long; it needs "
                f"at least {self.MIN_SECRET_BYTES} so it cannot be guessed. Generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` and give "
                "every member of the grid the same one"
            )
        self._secret = secret

    def _tag(self, body: bytes, context: bytes | str) -> bytes:
        bound = context.encode() if isinstance(context, str) else bytes(context)
        mac = hmac.new(self._secret, len(bound).to_bytes(4, "big"), hashlib.sha256)
        mac.update(bound)
        mac.update(body)
        return mac.digest()

    def encode(
        self,
        value: Any,
        *,
        path: str = "value",
        limit: int | None = None,
        context: bytes | str = b"",
    ) -> bytes:
        """Pickle and sign ``value`` bound to ``context``; ``limit`` caps the message."""
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise CodecError(
                f"cannot pickle {path}: {type(exc).__name__}: {exc}; pass picklable data "
                "(module-level functions and classes, no lambdas or open resources)",
                path=path,
            ) from None
        data = self._MAGIC + self._tag(body, context) + body
        return _check_limit(data, path, limit)

    def decode(self, data: bytes, *, path: str = "value", context: bytes | str = b"") -> Any:
        """Verify the signature (of the message and ``context``), then unpickle; a bad
        signature is a CodecError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(
                f"cannot decode {path}: expected bytes, got {_type_name(data)}", path=path
            )
        data = bytes(data)
        head = len(self._MAGIC) + self._TAG_LEN
        if len(data) < head or not data.startswith(self._MAGIC):
            raise CodecError(
                f"cannot decode {path}: not a signed pickle message; HMAC does not verify",
                path=path,
            )
        tag, body = data[len(self._MAGIC) : head], data[head:]
        if not hmac.compare_digest(tag, self._tag(body, context)):
            raise CodecError(
                f"cannot decode {path}: HMAC does not verify; the message was altered, "
                "signed with another secret (do all grid members share the same secret?) "
                "or signed for another request",
                path=path,
            )
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise CodecError(
                f"cannot unpickle {path}: {type(exc).__name__}: {exc}; is the class's "
                "module importable in this process?",
                path=path,
            ) from None
