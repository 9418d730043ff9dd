#!/bin/bash
# pygirder boot robot: on every boot, fetch this instance's user-data through IMDSv2 and run it.
#
# The template image installs this as /usr/local/libexec/pygirder-boot; the systemd unit
# pygirder-boot.service runs it as the unprivileged service user, with its output appended
# to /var/log/pygirder/boot.log.  cloud-init is told not to run user-data itself, so the
# user-data runs exactly once per boot, never as root.  The local data plane
# (`pygirder cloud simulate`) runs this same file for every simulated instance, with
# PYGIRDER_IMDS_ENDPOINT pointing at that instance's IMDS emulator.
#
# Only scripts (user-data starting with "#!") are run; anything else (cloud-config, MIME)
# is logged and left alone.  The user-data replaces this process (exec), so systemd's
# stop signals reach it directly.
set -Eeuo pipefail
umask 077

readonly IMDS="${PYGIRDER_IMDS_ENDPOINT:-http://169.254.169.254}"
readonly STATE="${HOME:?}/pygirder"
readonly USER_DATA="$STATE/user-data"
# How long to wait for the metadata service at boot (the network may still be coming up).
readonly IMDS_ATTEMPTS=60

log() {
    printf '%s pygirder-boot: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

imds_token() {
    curl --silent --show-error --fail --noproxy '*' --max-time 2 \
        --request PUT --header 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
        "$IMDS/latest/api/token"
}

mkdir -p "$STATE"
log "boot as $(id -un) (uid $(id -u)); metadata service $IMDS"

token=""
for ((attempt = 1; attempt <= IMDS_ATTEMPTS; attempt++)); do
    if token=$(imds_token 2>/dev/null) && [[ -n $token ]]; then
        break
    fi
    token=""
    sleep 1
done
if [[ -z $token ]]; then
    log "no IMDSv2 session token from $IMDS after $IMDS_ATTEMPTS attempts; giving up"
    exit 1
fi

status=$(curl --silent --show-error --noproxy '*' --max-time 10 \
    --header "X-aws-ec2-metadata-token: $token" \
    --output "$USER_DATA.part" --write-out '%{http_code}' \
    "$IMDS/latest/user-data") || status="unreachable"
case $status in
    200) ;;
    404)
        rm -f "$USER_DATA.part"
        log "this instance has no user-data: nothing to run"
        exit 0
        ;;
    *)
        rm -f "$USER_DATA.part"
        log "the metadata service answered $status for the user-data; giving up"
        exit 1
        ;;
esac
mv -f "$USER_DATA.part" "$USER_DATA"
chmod 0700 "$USER_DATA"

if [[ $(head -c 2 "$USER_DATA") != "#!" ]]; then
    log "the user-data is not a script (it does not start with #!): not running it"
    exit 0
fi
log "running the user-data ($(wc -c <"$USER_DATA") bytes)"
cd "$HOME"
exec "$USER_DATA"
