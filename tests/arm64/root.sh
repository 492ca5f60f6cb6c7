#!/usr/bin/env bash
# A Debian arm64 root in which `make test-arm64` runs the device side of edgeft under qemu-user.
#
#   tests/arm64/root.sh prepare       build the root once (cached outside the clone), install the
#                                     working tree's edgeft with its device extra into /opt/venv
#                                     there; exit 0 when ready, 77 after one "skipped" line
#                                     (not root, no binfmt_misc)
#   tests/arm64/root.sh run CMD...    run CMD inside the root (chroot, /proc and /dev bound)
#
# Environment: EDGEFT_ARM64_ROOT (default /var/cache/edgeft/arm64-root), EDGEFT_ARM64_EXTRA (the
# extra to install, default device), EDGEFT_ARM64_MIRROR (Debian mirror for debootstrap).
set -euo pipefail

ROOT=${EDGEFT_ARM64_ROOT:-/var/cache/edgeft/arm64-root}
EXTRA=${EDGEFT_ARM64_EXTRA:-device}
MIRROR=${EDGEFT_ARM64_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm # its python3 is 3.11, the version edgeft supports
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BINFMT=/proc/sys/fs/binfmt_misc
QEMU=/usr/libexec/qemu-binfmt/aarch64-binfmt-P
ROOT_STAMP=$ROOT/.edgeft-root-complete # written last: a root without it is rebuilt
SKIPPED=77

say() { printf 'test-arm64: %s\n' "$*"; }
skip() {
    say "skipped: $*"
    exit "$SKIPPED"
}

# Root and binfmt_misc are what CI may lack; anything else that goes wrong later is a failure.
check_host() {
    [[ $(id -u) == 0 ]] || skip "not root (debootstrap, chroot and binfmt_misc need root)"
    [[ $(uname -m) == aarch64 ]] && return # native: no emulation needed
    if ! mountpoint -q "$BINFMT"; then
        mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null || skip "binfmt_misc cannot be mounted at $BINFMT"
    fi
}

install_tools() {
    command -v debootstrap >/dev/null && [[ -e $QEMU ]] && return
    say "installing debootstrap and qemu-user-static"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static >/dev/null
}

# The F flag in Debian's entry opens the interpreter now, so it need not exist inside the root.
register_qemu() {
    [[ $(uname -m) == aarch64 || -e $BINFMT/qemu-aarch64 ]] && return
    local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [[ -r $conf ]] || skip "$conf missing (qemu-user-static not installed?)"
    grep -v '^#' "$conf" >"$BINFMT/register" 2>/dev/null || skip "cannot register qemu-aarch64 with binfmt_misc"
}

# debootstrap mounts /proc and /sys in the target while it works: a private mount namespace
# drops whatever it leaves mounted when it exits, even if it is killed.
build_root() {
    local wanted="$SUITE $PACKAGES"
    [[ -f $ROOT_STAMP && $(<"$ROOT_STAMP") == "$wanted" ]] && return
    # Only a directory this script made is ever deleted (EDGEFT_ARM64_ROOT may be mistyped).
    if [[ -e $ROOT && ! -e $ROOT/.edgeft-root && -n $(ls -A "$ROOT") ]]; then
        echo "test-arm64: $ROOT is not empty and not an edgeft root; refusing to replace it" >&2
        return 1
    fi
    say "building the arm64 root in $ROOT (debootstrap $SUITE, a few minutes)"
    rm -rf "$ROOT" && mkdir -p "$ROOT" && touch "$ROOT/.edgeft-root"
    local start=$SECONDS
    unshare --mount --propagation private \
        debootstrap --arch arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 ||
        {
            tail -20 "$ROOT.log" >&2
            return 1
        }
    echo "$wanted" >"$ROOT_STAMP"
    say "root built in $((SECONDS - start)) s"
}

# The host's pip settings as one [global] section, most specific source winning (pip's order:
# global < user < site < environment), minus locations on the host's disk: its find-links
# directories and file:// indexes do not exist in the root and hold x86_64 wheels anyway.
pip_conf() {
    declare -A value rank
    local line key val variant r item kept
    while IFS= read -r line; do
        key=${line%%=*} val=${line#*=}
        val=${val#\'} val=${val%\'}
        variant=${key%%.*} key=${key#*.}
        case $variant in global) r=1 ;; user) r=2 ;; site) r=3 ;; :env:) r=4 ;; *) continue ;; esac
        kept=()
        for item in $val; do
            [[ $key == cert || ! ($item == /* || $item == file:*) ]] && kept+=("$item")
        done
        if ((${#kept[@]} && r > ${rank[$key]:-0})); then
            value[$key]=${kept[*]} rank[$key]=$r
        fi
    done < <(python3 -m pip config list)
    echo "[global]"
    for key in "${!value[@]}"; do echo "$key = ${value[$key]}"; done | sort # stable: the venv stamp hashes it
}

# What the root needs from the host on every run (the network or the CA bundle may change).
configure_root() {
    cp /etc/resolv.conf /etc/hosts "$ROOT/etc/"
    pip_conf >"$ROOT/etc/pip.conf"
    local cert
    cert=$(sed -n 's/^cert = //p' "$ROOT/etc/pip.conf")
    cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
    mkdir -p "$ROOT$(dirname "$cert")" && cp "$cert" "$ROOT$cert"
}

# The working tree as git sees it (tracked and untracked, not ignored), so the root tests what
# is checked out, uncommitted edits included. edgeft is installed editable: only a change of
# its dependencies needs a new venv.
sync_source() {
    rm -rf "$ROOT/opt/edgeft" && mkdir -p "$ROOT/opt/edgeft"
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -e $REPO/$f ]] && printf '%s\0' "$f"; done |
        tar -C "$REPO" --null -T - -cf - | tar -C "$ROOT/opt/edgeft" -xf -
}

# One venv per extra (/opt/venv-device, /opt/venv-<extra>), /opt/venv pointing at the one asked for:
# switching extras back and forth costs nothing once both exist, and a failed install leaves
# the previous venv working.
install_venv() {
    local venv=/opt/venv-$EXTRA wanted stamp
    stamp=$ROOT$venv/.edgeft-installed
    wanted=$(cat "$REPO/setup.cfg" "$REPO/pyproject.toml" "$ROOT/etc/pip.conf" | sha256sum | cut -c1-16)
    if ! [[ -f $stamp && $(<"$stamp") == "$wanted" ]]; then
        say "installing edgeft[$EXTRA] into the root's $venv from the package registries"
        local start=$SECONDS
        rm -rf "${ROOT:?}$venv"
        in_root python3 -m venv "$venv"
        in_root "$venv/bin/pip" install --quiet --disable-pip-version-check -e "/opt/edgeft[$EXTRA]" || {
            say "pip could not install edgeft[$EXTRA] for aarch64 (EDGEFT_ARM64_EXTRA picks another extra)" >&2
            return 1
        }
        echo "$wanted" >"$stamp"
        say "pip install inside the root took $((SECONDS - start)) s"
    fi
    ln -sfn "venv-$EXTRA" "$ROOT/opt/venv"
}

# CMD inside the root. /proc and /dev are bound in a private mount namespace, so they vanish
# when CMD ends however it ends (no trap can miss them). Never /sys: onnxruntime's cpuinfo
# crashes under qemu when it can read /sys. The host's environment stays out (env -i).
in_root() {
    unshare --mount --propagation private bash "${BASH_SOURCE[0]}" _chroot "$@"
}

chroot_cmd() {
    mount --bind /proc "$ROOT/proc"
    mount --rbind /dev "$ROOT/dev"
    exec chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 "$@"
}

prepare() {
    check_host
    install_tools
    register_qemu
    mkdir -p "$(dirname "$ROOT")"
    exec 9>"$ROOT.lock" && flock 9 # one builder at a time
    build_root
    configure_root
    [[ $(in_root uname -m) == aarch64 ]] || {
        echo "test-arm64: the root does not run as aarch64 (is $BINFMT/qemu-aarch64 enabled, with flag F?)" >&2
        return 1
    }
    sync_source
    install_venv
}

case ${1:-} in
prepare) prepare ;;
run) shift && in_root "$@" ;;
_chroot) shift && chroot_cmd "$@" ;;
*)
    echo "usage: $0 prepare | run CMD..." >&2
    exit 2
    ;;
esac
