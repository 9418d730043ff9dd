"""The user-data script every pygirder instance boots with, rendered from the launch's settings.

One short bash script for every role.  The template image's boot robot runs it on
each boot as the unprivileged service user; it

1. announces ``up`` on the status topic (through the agent, which reads IMDSv2),
2. fetches the artifact, checks its SHA-256 and installs it into ``~/pygirder/venv``,
3. runs the role through the agent from that venv, with the time-to-live,

logging everything to ``~/pygirder/boot.log``.  A ``trap`` on ERR announces
``failed`` (with the line and the exit status) and then waits for the time-to-live
before shutting down, so a broken instance stays up for inspection but never for
longer than it was paid for.

It holds no secrets: the Redis password is read from SSM at run time with the
instance role, and AWS credentials come from the instance profile.

Contract with the image (``pygirder cloud image build``): pygirder and its
dependencies are installed in the Python at ``/opt/pygirder/bin/python3``, the
service user may run ``sudo shutdown -h now``, and cloud-init does not also run the
user-data as root.  Two environment variables are the seams of a simulated instance
(``pygirder cloud rehearse``): ``PYGIRDER_PYTHON`` replaces the image's Python and
``PYGIRDER_SHUTDOWN_COMMAND`` the shutdown command (the agent never runs the real
one when ``PYGIRDER_IMDS_ENDPOINT`` points at an emulator).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from ...errors import ConfigError
from .common import DEFAULT_REDIS_PORT, DEFAULT_SPOT_INTERVAL_S, Role, pygirder_version

__all__ = ["DEFAULT_BASE_PYTHON", "MAX_USER_DATA_BYTES", "render_user_data"]

DEFAULT_BASE_PYTHON = "/opt/pygirder/bin/python3"
# EC2 refuses user-data over 16 KiB (before base64).
MAX_USER_DATA_BYTES = 16384

_TOKEN = re.compile(r"[A-Za-z0-9/][A-Za-z0-9._:/+=@-]*")


def _check_token(what: str, value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} may hold only letters, digits and ._:/+=@- "
            "(it goes into a shell script and AWS resource names)"
        )
    return value


def render_user_data(
    *,
    topic_arn: str,
    region: str,
    launch_id: str,
    fleet: str,
    name: str,
    role: Role | str,
    artifact_uri: str,
    artifact_sha256: str,
    redis: str | None = None,
    port: int = DEFAULT_REDIS_PORT,
    pool: str = "default",
    parent: str | None = None,
    imports: Sequence[str] = (),
    processes: str = "auto",
    ttl: float | None = None,
    expires: datetime | None = None,
    spot_interval_s: float = DEFAULT_SPOT_INTERVAL_S,
    base_python: str = DEFAULT_BASE_PYTHON,
    store: str | None = None,
    controller_queue_url: str | None = None,
) -> str:
    """The bash user-data of one instance.

    The time-to-live is absolute in the script: ``expires``, or ``ttl`` seconds from
    now (the clock starts when the launch renders it, as for the ``pygirder:expires``
    tag); exactly one of the two is required.  ``redis`` (``redis://HOST:PORT/DB``,
    no password) is required for workers and distributors, ``parent`` for
    distributors.  ``spot_interval_s`` is how often the agent asks IMDS for a spot
    interruption notice.  Workers keep durable results in ``store`` (default:
    ``results/`` in the artifact's bucket, where every fleet of the setup finds them).
    ``controller_queue_url`` (redis role only) runs the fleet controller beside the
    server, reading announcements from that queue.
    """
    role = Role(role)
    if (ttl is None) == (expires is None):
        raise ConfigError("render_user_data needs exactly one of ttl= and expires=")
    if expires is None:
        assert ttl is not None
        if ttl <= 0:
            raise ConfigError(f"ttl must be positive seconds, not {ttl}")
        expires = datetime.now(UTC) + timedelta(seconds=ttl)
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    stamp = expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if not re.fullmatch(r"[0-9a-f]{64}", artifact_sha256):
        raise ConfigError(
            f"artifact_sha256 must be 64 lowercase hex digits, not {artifact_sha256!r}"
        )
    if not artifact_uri.startswith("s3://"):
        raise ConfigError(f"artifact_uri must be an s3:// URI, not {artifact_uri!r}")
    for what, value in (
        ("topic_arn", topic_arn), ("region", region), ("launch_id", launch_id),
        ("fleet", fleet), ("name", name), ("pool", pool), ("processes", processes),
        ("artifact_uri", artifact_uri), ("base_python", base_python),
    ):  # fmt: skip
        _check_token(what, value)
    for module in imports:
        _check_token("import", module)
    if role is not Role.REDIS and not redis:
        raise ConfigError(f"role {role} needs redis= (redis://HOST:PORT/DB of the Redis node)")
    if redis and "@" in redis:
        raise ConfigError("redis= must not hold a password: the agent reads it from SSM")
    if role is Role.DISTRIBUTOR and not parent:
        raise ConfigError("role distributor needs parent= (the pool it links up to)")

    q = shlex.quote
    run_args = [
        '"$ROLE"', '--topic-arn "$TOPIC_ARN"', '--launch-id "$LAUNCH_ID"',
        '--fleet "$FLEET"', '--name "$NAME"',
    ]  # fmt: skip
    if role is Role.REDIS:
        run_args.append(f"--port {int(port)}")
        if controller_queue_url:
            url = _check_token("controller_queue_url", controller_queue_url)
            run_args.append(f"--controller-queue-url {q(url)}")
    else:
        assert redis is not None
        run_args.append(f"--redis {q(_check_token('redis', redis))}")
        run_args.append(f"--pool {q(pool)}")
    if role is Role.DISTRIBUTOR:
        assert parent is not None
        run_args.append(f"--parent {q(_check_token('parent', parent))}")
    if role is Role.WORKER:
        run_args.append(f"--processes {q(processes)}")
        bucket = artifact_uri[len("s3://") :].partition("/")[0]
        run_args.append(f"--store {q(_check_token('store', store or f's3://{bucket}/results'))}")
        run_args.extend(f"--import {q(m)}" for m in imports)
    if spot_interval_s != DEFAULT_SPOT_INTERVAL_S:
        run_args.append(f"--spot-interval {float(spot_interval_s):g}")
    run_args += ['--expires "$EXPIRES"', '"${SHUTDOWN_OPTS[@]}"']
    run_lines = " \\\n    ".join(run_args)

    script = f"""#!/bin/bash
# pygirder instance boot script, rendered by pygirder {pygirder_version()}.
# Role {role} of fleet {fleet}, launch {launch_id}; shuts itself down at {stamp}.
# The image's boot robot runs it as the service user on every boot. No secrets here:
# the Redis password comes from SSM at run time, credentials from the instance role.
set -Eeuo pipefail
umask 077

readonly TOPIC_ARN={q(topic_arn)}
readonly LAUNCH_ID={q(launch_id)}
readonly FLEET={q(fleet)}
readonly NAME={q(name)}
readonly ROLE={q(str(role))}
readonly ARTIFACT_URI={q(artifact_uri)}
readonly ARTIFACT_SHA256={q(artifact_sha256)}
readonly EXPIRES={q(stamp)}
export AWS_DEFAULT_REGION={q(region)}

# A simulated instance replaces the image's Python and the shutdown command.
readonly PYTHON="${{PYGIRDER_PYTHON:-{base_python}}}"
SHUTDOWN_OPTS=()
if [[ -n "${{PYGIRDER_SHUTDOWN_COMMAND:-}}" ]]; then
    SHUTDOWN_OPTS=(--shutdown-command "$PYGIRDER_SHUTDOWN_COMMAND")
fi
readonly STATE="${{HOME:?}}/pygirder"
readonly VENV="$STATE/venv"
readonly LOG="$STATE/boot.log"
mkdir -p "$STATE"
exec >>"$LOG" 2>&1
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) pygirder boot: role $ROLE, launch $LAUNCH_ID"

agent() {{
    "$PYTHON" -m pygirder.cloud.instance.agent "$@"
}}

announce() {{
    agent announce --topic-arn "$TOPIC_ARN" --launch-id "$LAUNCH_ID" --fleet "$FLEET" \\
        --role "$ROLE" --event "$1" --detail "${{2:-}}"
}}

on_error() {{
    local status=$? line=$1
    trap - ERR
    set +e
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) boot failed at line $line with status $status"
    announce failed "boot script failed at line $line with status $status; see $LOG"
    # Stay up for inspection until the time-to-live, then shut down.
    agent wait-expiry --expires "$EXPIRES" "${{SHUTDOWN_OPTS[@]}}" --topic-arn "$TOPIC_ARN" \\
        --launch-id "$LAUNCH_ID" --fleet "$FLEET" --role "$ROLE"
    exit "$status"
}}
trap 'on_error $LINENO' ERR

announce up
agent fetch-artifact "$ARTIFACT_URI" --sha256 "$ARTIFACT_SHA256" --venv "$VENV"
"$VENV/bin/python" -m pygirder.cloud.instance.agent run {run_lines}
"""
    size = len(script.encode())
    if size > MAX_USER_DATA_BYTES:
        raise ConfigError(f"user-data is {size} bytes, over EC2's {MAX_USER_DATA_BYTES}")
    return script
