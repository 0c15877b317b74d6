#!/usr/bin/env bash
# Install (or remove) one fedmq piece on a Debian/Ubuntu machine.
#
#   sudo deploy/install.sh broker --pki DIR [--listen ADDRESS] [--cert-port]
#   sudo deploy/install.sh aggregator [--config FILE] [--extras EXTRAS]
#   sudo deploy/install.sh agent --instance NAME [--config FILE] [--extras EXTRAS]
#   sudo deploy/install.sh keyholder [--config FILE] [--extras EXTRAS]
#   sudo deploy/install.sh ROLE [--instance NAME] --uninstall [--purge]
#
# broker      mosquitto with broker_config/production.conf as /etc/mosquitto/mosquitto.conf
#             (the packaged one kept as mosquitto.conf.dist), acl.conf, the CA and server
#             certificate from DIR (`fedmq certs`) and an empty password file in
#             /etc/mosquitto/fedmq/; its listeners bind ADDRESS (default 127.0.0.1: this
#             machine only). Restarts mosquitto.
# aggregator  the `fedmq-aggregator` service: /etc/fedmq/aggregator.toml, state in
#             /var/lib/fedmq.
# agent       one edge agent, `fedmq-agent@NAME` (NAME is its device id, several may run on
#             one host): /etc/fedmq/agent-NAME.toml, state in /var/lib/fedmq/agent-NAME.
# keyholder   the HE key holder `fedmq-keyholder` (he = "ckks"; docs/privacy.md), best on
#             another host than the aggregator: /etc/fedmq-keyholder/keyholder.toml, state
#             in /var/lib/fedmq-keyholder, run as its own system user `fedmq-keyholder`, the
#             only one that may read its secret key (/etc/fedmq-keyholder/he-secret.ctx,
#             installed by hand: the script prints how).
#
# The services run as the system user `fedmq` from a virtualenv in /opt/fedmq/venv with
# fedmq installed from this checkout (EXTRAS: pyproject extras, default "sim,secure": the
# bundled demo data and signed models; "he" for the key holder; "none" for the base
# install). A config is copied from
# FILE (e.g. what `fedmq enroll --config FILE` wrote) or from the example in deploy/, and an
# existing one is never overwritten. Nothing is started: the script prints how.
#
# Running it again changes nothing but upgrading fedmq in the virtualenv. --uninstall stops
# and removes the services, units and, with the last of them, the virtualenv; configs and
# state stay unless --purge (which also removes the user once no fedmq service is left; the
# key holder's user with the key holder; a secret key stays until you delete it).
#
# DESTDIR=DIR installs into DIR instead of / (a staging tree; the tests use it): no packages,
# user, file ownership, virtualenv or systemctl, and root is not needed. --no-user: the user
# (`fedmq`, or `fedmq-keyholder`) exists already (made by an image or a directory service),
# do not create or remove it.
set -euo pipefail

DESTDIR="${DESTDIR:-}"
DESTDIR="${DESTDIR%/}"
PREFIX=/opt/fedmq
VENV="$PREFIX/venv"
CONF_DIR=/etc/fedmq
STATE_DIR=/var/lib/fedmq
UNIT_DIR=/etc/systemd/system
MOSQ_DIR=/etc/mosquitto
MOSQ_FEDMQ="$MOSQ_DIR/fedmq"
SERVICE_USER=fedmq
MARK="fedmq production broker"  # first line of broker_config/production.conf

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd -- "$SCRIPT_DIR/.." && pwd)"

usage() {
    cat >&2 <<'USAGE'
usage: sudo deploy/install.sh broker --pki DIR [--listen ADDRESS] [--cert-port]
       sudo deploy/install.sh aggregator [--config FILE] [--extras EXTRAS]
       sudo deploy/install.sh agent --instance NAME [--config FILE] [--extras EXTRAS]
       sudo deploy/install.sh keyholder [--config FILE] [--extras EXTRAS]
       sudo deploy/install.sh ROLE [--instance NAME] --uninstall [--purge]
  EXTRAS: comma-separated pyproject extras, or 'none' (default: sim,secure; he for the
          keyholder)
  DESTDIR=DIR: a staged install into DIR (see the comment at the top of this script)
USAGE
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
    broker | agent | aggregator | keyholder) ;;
    -h | --help) usage ;;
    *) echo "install.sh: unknown role '$ROLE'" >&2; usage ;;
esac

EXTRAS="sim,secure"
[ "$ROLE" = keyholder ] && EXTRAS="he"  # TenSEAL; no demo data, no model training
INSTANCE=""
CONFIG_FROM=""
PKI=""
LISTEN="127.0.0.1"
CERT_PORT=no
UNINSTALL=no
PURGE=no
MAKE_USER=yes
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --extras) need_value "$@"; EXTRAS="$2"; shift 2 ;;
        --instance) need_value "$@"; INSTANCE="$2"; shift 2 ;;
        --config) need_value "$@"; CONFIG_FROM="$2"; shift 2 ;;
        --pki) need_value "$@"; PKI="$2"; shift 2 ;;
        --listen) need_value "$@"; LISTEN="$2"; shift 2 ;;
        --cert-port) CERT_PORT=yes; shift ;;
        --uninstall) UNINSTALL=yes; shift ;;
        --purge) UNINSTALL=yes; PURGE=yes; shift ;;
        --no-user) MAKE_USER=no; shift ;;
        -h | --help) usage ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage ;;
    esac
done
[ "$EXTRAS" = none ] && EXTRAS=""
if [[ -n "$EXTRAS" && ! "$EXTRAS" =~ ^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$ ]]; then
    die "--extras must look like 'sim' or 'sim,compress', not '$EXTRAS'"
fi
if [ "$ROLE" = agent ]; then
    [ -n "$INSTANCE" ] || die "an agent needs --instance NAME (its device id, e.g. pi-kitchen-01)"
    [[ "$INSTANCE" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] \
        || die "--instance '$INSTANCE' is not a device id (1-64 of A-Z a-z 0-9 _ . -)"
elif [ -n "$INSTANCE" ]; then
    die "--instance is for agents only"
fi
if [[ ! "$LISTEN" =~ ^[A-Za-z0-9_.:-]+$ ]]; then
    die "--listen takes one address (e.g. 192.0.2.10 or 0.0.0.0), not '$LISTEN'"
fi

# A staged install (DESTDIR) leaves out everything that needs the real machine.
STAGED=no
[ -n "$DESTDIR" ] && STAGED=yes
[ "$STAGED" = yes ] && MAKE_USER=no

# Scratch files (a rendered config, pip's build copy), removed however the script ends.
WORK="$(mktemp -d)"
trap 'rm -rf -- "$WORK"' EXIT

# -- helpers -----------------------------------------------------------------------------
# put MODE OWNER:GROUP SOURCE TARGET (TARGET without DESTDIR); ownership only on a real root.
put() {
    local mode="$1" owner="$2" source="$3" target="$DESTDIR$4"
    if [ "$STAGED" = yes ]; then
        install -m "$mode" "$source" "$target"
    else
        install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$source" "$target"
    fi
}

# directory MODE OWNER:GROUP DIR
directory() {
    local mode="$1" owner="$2" target="$DESTDIR$3"
    if [ "$STAGED" = yes ]; then
        install -d -m "$mode" "$target"
    else
        install -d -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$target"
    fi
}

# remove PATH...: files and empty directories under DESTDIR, quietly if already gone.
remove() {
    local path
    for path in "$@"; do
        if [ -d "$DESTDIR$path" ] && [ ! -L "$DESTDIR$path" ]; then
            rmdir --ignore-fail-on-non-empty "$DESTDIR$path" 2>/dev/null || true
        elif [ -e "$DESTDIR$path" ] || [ -L "$DESTDIR$path" ]; then
            log "removing $path"
            rm -f -- "$DESTDIR$path"
        fi
    done
}

systemd_running() {
    [ "$STAGED" = no ] && [ -d /run/systemd/system ]
}

# systemctl ARGS..., only where systemd runs this machine.
sysctl_() {
    if systemd_running; then
        systemctl "$@"
    elif [ "$STAGED" = no ]; then
        echo "warning: systemd is not running here; skipped: systemctl $*" >&2
    fi
}

apt_install() {
    [ "$STAGED" = no ] || return 0
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand and rerun"
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

package_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# Units of fedmq services present (aggregator, agent template, key holder): the venv stays
# while any is left.
fedmq_units_left() {
    compgen -G "$DESTDIR$UNIT_DIR/fedmq-*.service" >/dev/null
}

# Units of services running as SERVICE_USER: the user, its config and state directories
# stay while any is left. The key holder's user is its own.
user_units_left() {
    [ "$ROLE" != keyholder ] || return 1
    [ -e "$DESTDIR$UNIT_DIR/fedmq-aggregator.service" ] \
        || compgen -G "$DESTDIR$UNIT_DIR/fedmq-agent*.service" >/dev/null
}

# -- checks ------------------------------------------------------------------------------
if [ "$STAGED" = no ]; then
    [ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $ROLE ..."
fi
[ -f "$REPO_DIR/pyproject.toml" ] || die "$REPO_DIR does not look like a fedmq checkout"

# ========================================================================================
# broker
# ========================================================================================
broker_install() {
    [ -n "$PKI" ] || die "the broker needs --pki DIR (made by: fedmq certs init --dir DIR; \
fedmq certs issue server --dir DIR --host ADDRESS)"
    local name
    for name in ca.crt server.crt server.key; do
        [ -r "$PKI/$name" ] || die "$PKI/$name is missing or unreadable (fedmq certs, see \
broker_config/README.md)"
    done
    package_installed mosquitto || apt_install mosquitto

    directory 0755 root:root "$MOSQ_DIR"
    directory 0755 root:root "$MOSQ_DIR/conf.d"
    # mosquitto reads the key, the password file and the ACLs after dropping to its user.
    directory 0750 root:mosquitto "$MOSQ_FEDMQ"
    put 0644 root:root "$PKI/ca.crt" "$MOSQ_FEDMQ/ca.crt"
    put 0644 root:root "$PKI/server.crt" "$MOSQ_FEDMQ/server.crt"
    put 0640 root:mosquitto "$PKI/server.key" "$MOSQ_FEDMQ/server.key"
    put 0640 root:mosquitto "$REPO_DIR/broker_config/acl.conf" "$MOSQ_FEDMQ/acl.conf"
    if [ -e "$DESTDIR$MOSQ_FEDMQ/passwd" ]; then
        log "keeping the accounts in $MOSQ_FEDMQ/passwd"
    else
        # mosquitto refuses to start without its password file, even an empty one.
        put 0640 root:mosquitto /dev/null "$MOSQ_FEDMQ/passwd"
    fi

    local conf="$DESTDIR$MOSQ_DIR/mosquitto.conf"
    if [ -f "$conf" ] && ! head -n 1 "$conf" | grep -q "$MARK" \
        && [ ! -e "$conf.dist" ]; then
        log "keeping the packaged config as $MOSQ_DIR/mosquitto.conf.dist"
        cp -p -- "$conf" "$conf.dist"
    fi
    local rendered="$WORK/mosquitto.conf"
    # Only the bind address changes: every listener line of the shipped file says 127.0.0.1.
    sed "s/^\(listener [0-9]*\) 127\.0\.0\.1\$/\1 $LISTEN/" \
        "$REPO_DIR/broker_config/production.conf" >"$rendered"
    if [ "$CERT_PORT" = no ]; then
        # Drop the client-certificate listener block (up to the blank line after it).
        sed -i '/^# Port 8884:/,/^$/d' "$rendered"
    fi
    log "installing $MOSQ_DIR/mosquitto.conf (production.conf, listening on $LISTEN)"
    put 0644 root:root "$rendered" "$MOSQ_DIR/mosquitto.conf"
    sysctl_ restart mosquitto

    echo
    echo "mosquitto runs broker_config/production.conf on $LISTEN:8883$(
        [ "$CERT_PORT" = yes ] && echo " and :8884")."
    echo "Accounts: sudo fedmq enroll NAME ... (then: sudo systemctl reload mosquitto)"
}

broker_uninstall() {
    local conf="$DESTDIR$MOSQ_DIR/mosquitto.conf"
    if [ -e "$conf.dist" ]; then
        log "restoring $MOSQ_DIR/mosquitto.conf from mosquitto.conf.dist"
        mv -f -- "$conf.dist" "$conf"
    elif [ -f "$conf" ] && head -n 1 "$conf" | grep -q "$MARK"; then
        echo "warning: no mosquitto.conf.dist to restore; $MOSQ_DIR/mosquitto.conf is still" \
            "fedmq's" >&2
    fi
    remove "$MOSQ_FEDMQ/ca.crt" "$MOSQ_FEDMQ/server.crt" "$MOSQ_FEDMQ/server.key" \
        "$MOSQ_FEDMQ/acl.conf"
    if [ "$PURGE" = yes ]; then
        remove "$MOSQ_FEDMQ/passwd" "$MOSQ_FEDMQ"
    elif [ -e "$DESTDIR$MOSQ_FEDMQ/passwd" ]; then
        log "keeping the accounts in $MOSQ_FEDMQ/passwd (--purge removes them)"
    fi
    if package_installed mosquitto; then
        sysctl_ restart mosquitto
    fi
}

# ========================================================================================
# aggregator and agents
# ========================================================================================
if [ "$ROLE" = agent ]; then
    UNIT_FILE="fedmq-agent@.service"
    SERVICE="fedmq-agent@$INSTANCE.service"
    CONFIG="$CONF_DIR/agent-$INSTANCE.toml"
    EXAMPLE="$SCRIPT_DIR/agent.toml"
    INSTANCE_STATE="$STATE_DIR/agent-$INSTANCE"
elif [ "$ROLE" = keyholder ]; then
    # A user, config and state directory of its own: nothing else on the host (an aggregator
    # or agent running as fedmq) may read the secret key.
    SERVICE_USER=fedmq-keyholder
    CONF_DIR=/etc/fedmq-keyholder
    STATE_DIR=/var/lib/fedmq-keyholder
    UNIT_FILE="fedmq-keyholder.service"
    SERVICE="fedmq-keyholder.service"
    CONFIG="$CONF_DIR/keyholder.toml"
    EXAMPLE="$SCRIPT_DIR/keyholder.toml"
    INSTANCE_STATE="$STATE_DIR"
    SECRET_KEY="$CONF_DIR/he-secret.ctx"  # where deploy/keyholder.toml expects it
else
    UNIT_FILE="fedmq-aggregator.service"
    SERVICE="fedmq-aggregator.service"
    CONFIG="$CONF_DIR/aggregator.toml"
    EXAMPLE="$SCRIPT_DIR/aggregator.toml"
    INSTANCE_STATE="$STATE_DIR"
fi

install_venv() {
    if [ "$STAGED" = yes ]; then
        log "staged install: no virtualenv in $VENV"
        return
    fi
    command -v python3 >/dev/null || die "python3 is not installed: apt-get install -y python3"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "fedmq needs Python >= 3.10, this is $(python3 --version 2>&1)"
    # Debian/Ubuntu ship venv/ensurepip separately from python3.
    if [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install python3-venv
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # Build from a copy so pip's in-tree build (build/, *.egg-info) leaves no root-owned
    # files in the checkout. Not an editable install: the service must not depend on the
    # checkout (a checkout under /home is unreadable to it anyway, because of ProtectHome=).
    local stage="$WORK/fedmq" item target
    mkdir -- "$stage"
    for item in pyproject.toml README.md fedmq edge_agent aggregator simulator LICENSE \
        LICENSE.txt NOTICE; do
        if [ -e "$REPO_DIR/$item" ]; then
            cp -R -- "$REPO_DIR/$item" "$stage/"
        fi
    done
    find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
    target="$stage"
    [ -n "$EXTRAS" ] && target="${stage}[${EXTRAS}]"
    log "installing fedmq from $REPO_DIR${EXTRAS:+ with extras [$EXTRAS]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade "$target"
    "$VENV/bin/fedmq" --help >/dev/null || die "the installed fedmq command does not run"
}

service_install() {
    if [ -n "$CONFIG_FROM" ]; then
        [ -r "$CONFIG_FROM" ] || die "cannot read --config $CONFIG_FROM"
        if [ "$ROLE" = agent ] && grep -Eq '^device_id *= *"' "$CONFIG_FROM" \
            && ! grep -Eq "^device_id *= *\"$INSTANCE\"" "$CONFIG_FROM"; then
            die "$CONFIG_FROM sets another device_id than the instance '$INSTANCE' (the unit \
runs the agent as --device-id $INSTANCE): pass --instance with its device id"
        fi
    fi
    if [ "$MAKE_USER" = yes ] && ! getent passwd "$SERVICE_USER" >/dev/null; then
        log "creating system user $SERVICE_USER"
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "fedmq service" "$SERVICE_USER"
    fi
    if [ "$STAGED" = no ] && ! getent passwd "$SERVICE_USER" >/dev/null; then
        die "user $SERVICE_USER does not exist (--no-user was given)"
    fi
    # systemd's StateDirectory= creates them too; doing it here lets you test by hand first.
    directory 0750 "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
    directory 0750 "$SERVICE_USER:$SERVICE_USER" "$INSTANCE_STATE"
    directory 0750 "root:$SERVICE_USER" "$CONF_DIR"
    directory 0755 root:root "$PREFIX"
    directory 0755 root:root "$UNIT_DIR"

    install_venv

    # Root owns the config, the service group may read it: it holds the MQTT password.
    if [ -e "$DESTDIR$CONFIG" ]; then
        log "keeping existing $CONFIG"
    elif [ -n "$CONFIG_FROM" ]; then
        log "installing $CONFIG_FROM as $CONFIG"
        put 0640 "root:$SERVICE_USER" "$CONFIG_FROM" "$CONFIG"
    else
        log "installing the example config as $CONFIG"
        local example="$WORK/example.toml"
        if [ "$ROLE" = agent ]; then
            sed -e "s|^device_id = .*|device_id = \"$INSTANCE\"|" \
                -e "s|^state_dir = .*|state_dir = \"$INSTANCE_STATE\"|" "$EXAMPLE" >"$example"
        else
            cp -- "$EXAMPLE" "$example"
        fi
        put 0640 "root:$SERVICE_USER" "$example" "$CONFIG"
    fi

    log "installing $UNIT_DIR/$UNIT_FILE"
    put 0644 root:root "$SCRIPT_DIR/$UNIT_FILE" "$UNIT_DIR/$UNIT_FILE"
    if [ "$ROLE" = agent ] && [ -e "$DESTDIR$UNIT_DIR/fedmq-agent.service" ]; then
        echo "warning: the single-agent unit fedmq-agent.service of an older install is still" \
            "there (state in $STATE_DIR): sudo deploy/install.sh agent --instance NAME" \
            "--uninstall removes it" >&2
    fi
    sysctl_ daemon-reload

    echo
    echo "fedmq $ROLE${INSTANCE:+ $INSTANCE} installed. Next:"
    if [ "$ROLE" = agent ]; then
        echo "  1. check $CONFIG: broker, credentials (fedmq enroll $INSTANCE --config FILE"
        echo "     on the broker), device_index/device_count"
    elif [ "$ROLE" = keyholder ]; then
        echo "  1. the secret key of fedmq keys he-init, here only (the aggregator and devices"
        echo "     get he-public.ctx): sudo install -m 0600 -o $SERVICE_USER -g $SERVICE_USER \\"
        echo "         he-secret.ctx $SECRET_KEY"
        echo "     and check $CONFIG: broker and credentials"
        echo "     (fedmq enroll fedmq-keyholder --role keyholder --config FILE on the broker),"
        echo "     fleet, min_updates (no more than the aggregator's)"
    else
        echo "  1. check $CONFIG: broker and credentials (sudo fedmq enroll"
        echo "     fedmq-aggregator --role aggregator --config $CONFIG), min_updates, rounds"
    fi
    echo "  2. sudo systemctl enable --now $SERVICE"
    echo "  3. journalctl -u $SERVICE -f"
}

service_uninstall() {
    sysctl_ disable --now "$SERVICE" || true
    if [ "$ROLE" = agent ]; then
        remove "$UNIT_DIR/fedmq-agent.service"  # an older install's single agent
        if compgen -G "$DESTDIR$UNIT_DIR/*.wants/fedmq-agent@*.service" >/dev/null; then
            log "keeping $UNIT_DIR/$UNIT_FILE: other agents are enabled"
        else
            remove "$UNIT_DIR/$UNIT_FILE"
        fi
    else
        remove "$UNIT_DIR/$UNIT_FILE"
    fi
    sysctl_ daemon-reload
    if [ "$PURGE" = yes ]; then
        remove "$CONFIG"
        if [ "$ROLE" = agent ] || [ "$ROLE" = keyholder ]; then
            if [ -d "$DESTDIR$INSTANCE_STATE" ]; then
                log "removing $INSTANCE_STATE"
                rm -rf -- "$DESTDIR$INSTANCE_STATE"
            fi
        else
            remove "$STATE_DIR/aggregator.ckpt" "$STATE_DIR/aggregator.ckpt.round-0" \
                "$STATE_DIR/aggregator.ckpt.round-1" "$STATE_DIR/aggregator.ckpt.model-0" \
                "$STATE_DIR/aggregator.ckpt.model-1" "$STATE_DIR/aggregator.ckpt.history" \
                "$STATE_DIR/aggregator.ckpt.updates-0" "$STATE_DIR/aggregator.ckpt.updates-1" \
                "$STATE_DIR/metrics.jsonl"
        fi
    else
        log "keeping $CONFIG and $INSTANCE_STATE (--purge removes them)"
    fi
    if [ "$PURGE" = yes ] && [ "$ROLE" = keyholder ] && [ -e "$DESTDIR$SECRET_KEY" ]; then
        echo "warning: keeping the secret key $SECRET_KEY: it decrypts every update" \
            "encrypted to it; delete it yourself (shred -u) once no fleet uses it" >&2
    fi
    if ! fedmq_units_left && [ -d "$DESTDIR$PREFIX" ]; then
        log "removing $PREFIX (no fedmq service is left)"
        rm -rf -- "$DESTDIR$PREFIX"
    fi
    if [ "$PURGE" = yes ] && ! user_units_left; then
        remove "$STATE_DIR" "$CONF_DIR"
        if [ "$MAKE_USER" = yes ] && getent passwd "$SERVICE_USER" >/dev/null; then
            log "removing system user $SERVICE_USER"
            userdel "$SERVICE_USER"
        fi
    fi
}

# ========================================================================================
case "$ROLE:$UNINSTALL" in
    broker:no) broker_install ;;
    broker:yes) broker_uninstall ;;
    *:no) service_install ;;
    *:yes) service_uninstall ;;
esac
