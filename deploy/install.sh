#!/usr/bin/env bash
# Install fedmq as a systemd service on a Debian/Ubuntu device or server.
#
#   sudo deploy/install.sh agent|aggregator [--extras EXTRAS]
#
# Installs the fedmq checkout this script lives in into /opt/fedmq/venv, creates the
# `fedmq` system user, copies the example config to /etc/fedmq/ (never overwriting an
# existing one) and installs the systemd unit. It does not start the service: it prints the
# command to do that once the config is edited. Safe to run again to upgrade.
#
# EXTRAS is a comma-separated list of pyproject extras (e.g. "sim" or "sim,compress"), or
# "none" for the base install only. The default is "sim" for both roles: the agent's base
# install needs only paho-mqtt, numpy and msgpack, and `sim` (scikit-learn) is only needed
# for the bundled digits demo data that agents train on and the aggregator evaluates on.
# Devices with their own data source can use --extras none.
set -euo pipefail

PREFIX=/opt/fedmq
VENV="$PREFIX/venv"
CONF_DIR=/etc/fedmq
STATE_DIR=/var/lib/fedmq
UNIT_DIR=/etc/systemd/system
SERVICE_USER=fedmq

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd -- "$SCRIPT_DIR/.." && pwd)"

usage() {
    echo "usage: sudo $0 agent|aggregator [--extras EXTRAS]" >&2
    echo "  EXTRAS: comma-separated pyproject extras, or 'none' (default: sim)" >&2
    exit 2
}

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

log() {
    echo "==> $*"
}

# -- arguments ---------------------------------------------------------------------------
[ $# -ge 1 ] || usage
ROLE="$1"
shift
case "$ROLE" in
    agent | aggregator) ;;
    -h | --help) usage ;;
    *) echo "install.sh: unknown role '$ROLE'" >&2; usage ;;
esac

EXTRAS="sim"
while [ $# -gt 0 ]; do
    case "$1" in
        --extras)
            [ $# -ge 2 ] || usage
            EXTRAS="$2"
            shift 2
            ;;
        --extras=*)
            EXTRAS="${1#--extras=}"
            shift
            ;;
        -h | --help) usage ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage ;;
    esac
done
if [ "$EXTRAS" = "none" ]; then
    EXTRAS=""
fi
if [[ -n "$EXTRAS" && ! "$EXTRAS" =~ ^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$ ]]; then
    die "--extras must look like 'sim' or 'sim,compress', not '$EXTRAS'"
fi

SERVICE="fedmq-$ROLE.service"
CONFIG="$ROLE.toml"

# -- checks ------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $ROLE"
[ -f "$REPO_DIR/pyproject.toml" ] || die "$REPO_DIR does not look like a fedmq checkout"
[ -f "$SCRIPT_DIR/$SERVICE" ] || die "missing $SCRIPT_DIR/$SERVICE"
[ -f "$SCRIPT_DIR/$CONFIG" ] || die "missing $SCRIPT_DIR/$CONFIG"
command -v python3 >/dev/null || die "python3 is not installed: apt-get install -y python3"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "fedmq needs Python >= 3.10, this is $(python3 --version 2>&1)"

apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand and rerun"
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# Debian/Ubuntu ship venv/ensurepip separately from python3.
if [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3-venv
fi

# The aggregator talks to a broker on the same machine by default.
if [ "$ROLE" = aggregator ]; then
    mosquitto_status="$(dpkg-query -W -f='${Status}' mosquitto 2>/dev/null || true)"
    if [ "$mosquitto_status" != "install ok installed" ]; then
        apt_install mosquitto
    fi
fi

# -- user and directories ----------------------------------------------------------------
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    log "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "fedmq service" "$SERVICE_USER"
fi
# systemd's StateDirectory= creates it too; doing it here lets you test by hand first.
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE_DIR"
install -d -o root -g "$SERVICE_USER" -m 0750 "$CONF_DIR"
install -d -o root -g root -m 0755 "$PREFIX"

# -- the virtualenv ----------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip

# Build from a copy so pip's in-tree build (build/, *.egg-info) leaves no root-owned files
# in the checkout. Not an editable install: the service must not depend on the checkout
# (a checkout under /home is unreadable to it anyway, because of ProtectHome=).
STAGE="$(mktemp -d)"
trap 'rm -rf -- "$STAGE"' EXIT
for item in pyproject.toml README.md edge_agent aggregator LICENSE LICENSE.txt NOTICE; do
    if [ -e "$REPO_DIR/$item" ]; then
        cp -R -- "$REPO_DIR/$item" "$STAGE/"
    fi
done
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +

TARGET="$STAGE"
if [ -n "$EXTRAS" ]; then
    TARGET="${STAGE}[${EXTRAS}]"
fi
log "installing fedmq from $REPO_DIR${EXTRAS:+ with extras [$EXTRAS]} into $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade "$TARGET"
"$VENV/bin/fedmq" --help >/dev/null || die "the installed fedmq command does not run"

# -- configuration -----------------------------------------------------------------------
# Root owns it, the service group may read it: it can hold the MQTT password.
if [ -e "$CONF_DIR/$CONFIG" ]; then
    log "keeping existing $CONF_DIR/$CONFIG (example: $SCRIPT_DIR/$CONFIG)"
else
    log "installing example config $CONF_DIR/$CONFIG"
    install -o root -g "$SERVICE_USER" -m 0640 "$SCRIPT_DIR/$CONFIG" "$CONF_DIR/$CONFIG"
fi

# -- systemd -----------------------------------------------------------------------------
log "installing $UNIT_DIR/$SERVICE"
install -o root -g root -m 0644 "$SCRIPT_DIR/$SERVICE" "$UNIT_DIR/$SERVICE"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
else
    echo "warning: systemd is not running here; run 'systemctl daemon-reload' on boot" >&2
fi

echo
echo "fedmq $ROLE installed. Next:"
if [ "$ROLE" = agent ]; then
    echo "  1. edit $CONF_DIR/$CONFIG: broker (the aggregator's broker), device_id,"
    echo "     device_index/device_count"
else
    echo "  1. edit $CONF_DIR/$CONFIG (min_updates, rounds, ...); to serve devices on other"
    echo "     machines, make mosquitto listen on the network (see $SCRIPT_DIR/README.md)"
fi
echo "  2. sudo systemctl enable --now $SERVICE"
echo "  3. journalctl -u ${SERVICE%.service} -f"
