#!/bin/sh
# Install this edge-slm bundle: verify checksums, put the release under <prefix>/opt/edge-slm/releases/,
# make its Python environment, install the agent config and the systemd unit, switch `current` to it.
# POSIX sh; run as root for a system install, or with --prefix DIR to install under DIR as any user.
set -eu

usage() {
    cat <<USAGE
usage: sh install.sh [--prefix DIR] [--python PY] [--no-venv] [--system-site-packages] [--no-start]

  --prefix DIR            install under DIR (DIR/opt/edge-slm, DIR/etc/edge-slm, DIR/var/lib/edge-slm)
                          instead of /; no systemd changes, no user created; any user may run it
  --python PY             the interpreter for the agent (default: python3)
  --no-venv               do not make a virtualenv: run the agent with PY itself, which must already
                          have the packages in requirements.txt (the bundle's edge-slm is unpacked
                          next to it)
  --system-site-packages  make the virtualenv see PY's packages (apt's python3-numpy, ...)
  --no-start              install and enable the service but do not (re)start it

examples:
  sudo sh install.sh
  sh install.sh --prefix "\$HOME/edge-slm-test" --python /usr/bin/python3.11
USAGE
}

PREFIX=""
PY="python3"
VENV=1
SITE=""
START=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { echo "install.sh: --prefix needs a directory" >&2; exit 2; }; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --python) [ $# -ge 2 ] || { echo "install.sh: --python needs an interpreter" >&2; exit 2; }; PY="$2"; shift 2 ;;
        --python=*) PY="${1#--python=}"; shift ;;
        --no-venv) VENV=0; shift ;;
        --system-site-packages) SITE="--system-site-packages"; shift ;;
        --no-start) START=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "edge-slm install: $*"; }
die() { echo "edge-slm install: error: $*" >&2; exit 1; }

HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
[ -f RELEASE ] && [ -f SHA256SUMS ] || die "run install.sh from an unpacked edge-slm bundle (RELEASE and SHA256SUMS missing)"
RELEASE=$(cat RELEASE)

# 1. checksums, on this machine, before anything is touched
if command -v sha256sum >/dev/null 2>&1; then
    sha256sum -c --quiet SHA256SUMS || die "checksums do not match: the bundle is corrupt or was edited; copy it again"
elif command -v shasum >/dev/null 2>&1; then
    shasum -a 256 -c SHA256SUMS >/dev/null || die "checksums do not match: the bundle is corrupt or was edited; copy it again"
else
    say "warning: neither sha256sum nor shasum found; checksums not verified here"
fi

# 2. where things go
case "$PREFIX" in
    "" | "/") PREFIX="" ;;
    /*) PREFIX="${PREFIX%/}" ;;
    *) PREFIX="$(pwd -P)/$PREFIX" ;;
esac
case "$PREFIX" in
    *[!A-Za-z0-9._/+-]*) die "--prefix may hold only letters, digits and . _ / + - (got $PREFIX)" ;;
esac
if [ -z "$PREFIX" ] && [ "$(id -u)" != "0" ]; then
    die "a system install needs root: sudo sh install.sh (or give --prefix DIR to install as yourself)"
fi
APP="$PREFIX/opt/edge-slm"
ETC="$PREFIX/etc/edge-slm"
STATE="$PREFIX/var/lib/edge-slm"
UNITDIR="$PREFIX/etc/systemd/system"
REL="$APP/releases/$RELEASE"
SVC_USER="edge-slm"
[ -n "$PREFIX" ] && SVC_USER="$(id -un)"
command -v "$PY" >/dev/null 2>&1 || die "python interpreter $PY not found; install python3 (3.10 or newer) or pass --python"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$PY is older than Python 3.10; edge-slm needs 3.10 or newer (pass --python)"

# 3. the release directory (a copy of this bundle), built under a temporary name
mkdir -p "$APP/releases"
if [ "$HERE" != "$REL" ]; then
    rm -rf "$REL.partial"
    mkdir -p "$REL.partial"
    cp -R "$HERE/." "$REL.partial/"
else
    mv "$REL" "$REL.partial"
fi
trap 'rm -rf "$REL.partial"' EXIT
cd "$REL.partial"
mkdir -p bin
WHEEL=""
for w in wheels/*.whl; do [ -f "$w" ] && WHEEL="$w"; done

# 4. the Python environment
if [ "$VENV" = 1 ]; then
    say "creating a virtualenv with $PY"
    "$PY" -m venv $SITE venv || die "could not create a virtualenv: install python3-venv (apt-get install python3-venv)"
    venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    say "installing requirements (numpy, the TFLite runtime, paho-mqtt, ...)"
    venv/bin/python -m pip install -q -r requirements.txt || die "pip could not install requirements.txt (network? a wheel for this platform?)"
    if [ -n "$WHEEL" ]; then
        venv/bin/python -m pip install -q --no-deps "$WHEEL" || die "pip could not install $WHEEL"
    else
        venv/bin/python -m pip install -q "edge-slm==$(cat VERSION)" || die "pip could not install edge-slm==$(cat VERSION)"
    fi
    ln -s ../venv/bin/edge-slm bin/edge-slm.real
    AGENT_PY="$REL/venv/bin/python"
    LIBPATH=""
else
    AGENT_PY="$(command -v "$PY")"
    LIBPATH=""
    if [ -n "$WHEEL" ]; then
        # a pure-Python wheel is a zip: unpacking it needs no pip and no network
        mkdir -p lib
        "$PY" -m zipfile -e "$WHEEL" lib/ || die "could not unpack $WHEEL"
        LIBPATH="$REL/lib"
    fi
    "$PY" -c 'import numpy, paho.mqtt, tokenizers' 2>/dev/null \
        || die "$PY lacks the packages in requirements.txt: $PY -m pip install -r $HERE/requirements.txt (or drop --no-venv)"
fi
# the one entry point the unit and the user call; absolute paths so it works from anywhere
{
    echo '#!/bin/sh'
    echo '# edge-slm launcher written by install.sh'
    echo '# never import edge_slm from the working directory (Python 3.11+ honours this)'
    echo 'export PYTHONSAFEPATH=1'
    if [ -n "$LIBPATH" ]; then
        echo "PYTHONPATH=\"$LIBPATH\${PYTHONPATH:+:\$PYTHONPATH}\" exec \"$AGENT_PY\" -m edge_slm.cli \"\$@\""
    else
        echo "exec \"$AGENT_PY\" -m edge_slm.cli \"\$@\""
    fi
} > bin/edge-slm
chmod 755 bin/edge-slm
rm -f bin/edge-slm.real

# 5. the release must load its models with this interpreter before it becomes current
mv "$REL.partial" "$REL.check"
trap 'rm -rf "$REL.check"' EXIT
rm -rf "$REL"
mv "$REL.check" "$REL"
trap - EXIT
cd "$REL"
for m in models/*/; do
    [ -d "$m" ] || continue
    say "checking ${m%/} with this runtime"
    bin/edge-slm validate "$REL/${m%/}" >/dev/null \
        || die "the model ${m%/} does not load or run here (edge-slm validate $REL/${m%/} says why); current release unchanged"
done

# 6. config, state directory
mkdir -p "$ETC" "$STATE"
if [ -d config ]; then mkdir -p "$ETC/files"; cp config/* "$ETC/files/"; fi
if [ -f "$ETC/agent.toml" ] && ! cmp -s "$ETC/agent.toml" agent.toml.installed 2>/dev/null; then
    cp "$ETC/agent.toml" "$ETC/agent.toml.previous"
fi
sed -e "s#\"/opt/edge-slm/#\"$APP/#g" -e "s#\"/etc/edge-slm/#\"$ETC/#g" -e "s#\"/var/lib/edge-slm\"#\"$STATE\"#g" \
    agent.toml > "$ETC/agent.toml.new"
mv "$ETC/agent.toml.new" "$ETC/agent.toml"
cp "$ETC/agent.toml" agent.toml.installed

# 7. switch `current` atomically; keep the one before as `previous` for rollback
OLD=""
[ -L "$APP/current" ] && OLD=$(readlink "$APP/current")
if [ -n "$OLD" ] && [ "$OLD" != "releases/$RELEASE" ]; then
    ln -sfn "$OLD" "$APP/previous"
fi
ln -sfn "releases/$RELEASE" "$APP/current.new"
mv -T "$APP/current.new" "$APP/current" 2>/dev/null || { rm -f "$APP/current"; mv "$APP/current.new" "$APP/current"; }
PREV=""
[ -L "$APP/previous" ] && PREV=$(readlink "$APP/previous")
for r in "$APP"/releases/*; do
    [ -d "$r" ] || continue
    case "releases/${r##*/}" in
        "releases/$RELEASE" | "$PREV") ;;
        *) say "removing old release ${r##*/}"; rm -rf "$r" ;;
    esac
done
cp "$REL/uninstall.sh" "$APP/uninstall.sh"
cp "$REL/rollback.sh" "$APP/rollback.sh"

# 8. the systemd unit
mkdir -p "$UNITDIR"
sed -e "s#@APP@#$APP#g" -e "s#@ETC@#$ETC#g" -e "s#@STATE@#$STATE#g" -e "s#@USER@#$SVC_USER#g" \
    edge-slm.service > "$UNITDIR/edge-slm.service"
say "installed release $RELEASE in $APP"
if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    if ! id "$SVC_USER" >/dev/null 2>&1; then
        useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin "$SVC_USER"
        touch "$APP/.created-user"
    fi
    chown -R "$SVC_USER:$SVC_USER" "$STATE"
    # the agent may rewrite its config (cmd/config); nobody else but root may read it (it can hold a password)
    chown -R "root:$SVC_USER" "$ETC"
    chmod 0770 "$ETC"
    chmod 0660 "$ETC/agent.toml"
    systemctl daemon-reload
    systemctl enable edge-slm.service >/dev/null
    if [ "$START" = 1 ]; then
        systemctl restart edge-slm.service
        say "service edge-slm started: journalctl -u edge-slm -f"
    else
        say "service edge-slm enabled; start it with: systemctl start edge-slm"
    fi
else
    say "systemd is not managing this install; run the agent with:"
    say "  $APP/current/bin/edge-slm run $ETC/agent.toml"
fi
