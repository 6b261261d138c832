#!/usr/bin/env bash
# Installs what livedisk needs on a fresh Debian 12 machine, and nothing that is already there:
# Debian packages (QEMU tools, libnbd, FUSE, openssl, mmdebstrap and umoci for `make images`,
# cpio and qemu-system-x86 for the test VM…),
# and the Rust components fmt and clippy.
# The Go-built harness (hack/harness/build.sh) and helm (hack/helm.sh) install themselves.
set -euo pipefail

log() { echo "deps: $*" >&2; }

# QEMU 7.2 from Debian 12 is the version the engine tests run on (qemu-storage-daemon lives in
# qemu-system-common there). Versions are Debian 12's; `make test` prints the ones it ran on.
APT_PACKAGES=(
  qemu-utils qemu-system-common libnbd-bin fuse3 e2fsprogs xfsprogs util-linux
  openssl jq unzip iproute2 procps curl ca-certificates socat python3-yaml
  # the gRPC client test (hack/grpc-clients.sh): a virtual environment for Python grpcio
  python3-venv
  # make images (hack/images.sh) and its test: root filesystems, OCI unpacking
  mmdebstrap umoci file
  # real nodes (hack/node.sh, hack/harness/node-build.sh): runc with seccomp, the pause program
  # and the test busybox image (static), kube-proxy's and the CNI plugins' iptables and conntrack
  gcc libc6-dev libseccomp-dev busybox-static iptables conntrack
  # the test VM (hack/vm/, docs/vm-test.md): its initramfs archive (readelf finds the guest
  # programs' libraries), the VM on the host
  cpio binutils qemu-system-x86
)

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    log "missing Debian packages: ${missing[*]} (run as root or install them: apt-get install ${missing[*]})"
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { log "cargo is missing: install Rust with rustup (https://rustup.rs)"; exit 1; }
command -v go >/dev/null || { log "go is missing: install Go >= 1.26"; exit 1; }
if command -v rustup >/dev/null; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || {
      log "adding Rust component $component"
      rustup component add "$component" >/dev/null
    }
  done
fi
log "ok: $(qemu-storage-daemon --version | head -n1), $(cargo --version), $(go version | cut -d' ' -f3)"
