#!/usr/bin/env bash
# `helm upgrade` of the installed chart to another livedisk image reference, as a user upgrades:
# the operator, the CSI controller and the node plugins roll; the engine pods do not (their image
# is engine.image, and their update strategy is OnDelete).
#
#   hack/chart-upgrade.sh --image-tag TAG
#
# Nodes here have no registry: the image the nodes hold under the chart's current tag is given the
# reference livedisk:TAG in every node's containerd (as a registry-less node receives a new image:
# by import), then `helm upgrade --reuse-values --set image.tag=TAG --wait`.
# Needs the cluster of hack/lib/chart-cluster.sh (LIVEDISK_STATE_DIR's env) and root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "chart-upgrade: ERROR: $*" >&2; exit 1; }
[ "${1:-}" = --image-tag ] && [ -n "${2:-}" ] || die "usage: $0 --image-tag TAG"
TAG="$2"
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "not an image tag: $TAG"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
[ -f "$STATE/env" ] || die "no cluster in $STATE"
# shellcheck disable=SC1091
source "$STATE/env"
HELM="$(hack/helm.sh | tail -n 1)"
current="$("$HELM" -n livedisk-system get values livedisk --all -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["image"].get("tag") or "")')"
[ -n "$current" ] || current="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/livedisk/Chart.yaml)"
read -r -a nodes <<< "${LIVEDISK_NODES:-node-a node-b}"
for node in "${nodes[@]}"; do
  hack/node.sh exec "$node" -- ctr images tag --force "docker.io/library/livedisk:$current" "docker.io/library/livedisk:$TAG" >/dev/null
done
echo "chart-upgrade: helm upgrade: image.tag $current -> $TAG" >&2
"$HELM" upgrade livedisk charts/livedisk --namespace livedisk-system --reuse-values --set "image.tag=$TAG" --wait --timeout 5m >/dev/null
