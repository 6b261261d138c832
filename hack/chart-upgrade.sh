#!/usr/bin/env bash
# `helm upgrade` of the installed chart to another livedisk image, as a user upgrades: the
# operator, the CSI controller and the node plugins roll; the engine pods do not (their image is
# engine.image, and their update strategy is OnDelete).
#
#   hack/chart-upgrade.sh --image-tag TAG [--rebuild]
#
# Nodes here have no registry; a registry-less node receives a new image by import:
#   without --rebuild: the image the nodes hold under the chart's current tag is given the
#     reference livedisk:TAG in every node's containerd (same image, new reference);
#   with --rebuild: a new image is built from the current one's archive (hack/images.sh's list in
#     the state dir) with one more layer, /etc/livedisk/image-build naming TAG and the image it
#     was built from, so it has a manifest digest of its own; it is imported into every node as
#     livedisk:TAG. (A rebuild from source with other binaries, hack/images.sh with another
#     SOURCE_DATE_EPOCH, takes minutes here; the layer makes a new image in seconds.)
# Then `helm upgrade --reuse-values --set image.tag=TAG --wait`. With --rebuild, prints
# "image-id: sha256:..." (the new image's config digest, as kubelet reports it in a container's
# imageID).
# Needs the cluster of hack/lib/chart-cluster.sh (LIVEDISK_STATE_DIR's env) and root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=hack/lib/oci-image.sh
source hack/lib/oci-image.sh
die() { echo "chart-upgrade: ERROR: $*" >&2; exit 1; }
usage() { die "usage: $0 --image-tag TAG [--rebuild]"; }
TAG="" REBUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --image-tag) [ -n "${2:-}" ] || usage; TAG="$2"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    *) usage ;;
  esac
done
[ -n "$TAG" ] || usage
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "not an image tag: $TAG"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
[ -f "$STATE/env" ] || die "no cluster in $STATE"
# shellcheck disable=SC1091
source "$STATE/env"
HELM="$(hack/helm.sh | tail -n 1)"
current="$("$HELM" -n livedisk-system get values livedisk --all -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["image"].get("tag") or "")')"
[ -n "$current" ] || current="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/livedisk/Chart.yaml)"
[ "$current" != "$TAG" ] || die "the chart runs livedisk:$TAG already"
read -r -a nodes <<< "${LIVEDISK_NODES:-node-a node-b}"

# A new image: the layers, config and history of livedisk:$current's archive, and one more layer.
rebuild() {
  local list="$STATE/images/images.txt" source_archive work
  # hack/images.sh's build, or the archive of an earlier rebuild.
  source_archive="$(awk -v ref="livedisk:$current" '$1 == ref {print $3}' "$list" 2>/dev/null)"
  [ -n "$source_archive" ] || source_archive="$STATE/images/livedisk_$current.oci.tar"
  [ -f "$source_archive" ] \
    || die "no archive of livedisk:$current in $list or $STATE/images (hack/images.sh builds it)"
  work="$(mktemp -d "${TMPDIR:-/tmp}/livedisk-upgrade.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  mkdir -p "$work/source" "$work/extra/etc/livedisk"
  tar -xf "$source_archive" -C "$work/source"
  local blobs="$work/source/blobs/sha256" manifest config i=0 digest layer
  manifest="$blobs/$(jq -r '.manifests[0].digest | sub("^sha256:"; "")' "$work/source/index.json")"
  config="$blobs/$(jq -r '.config.digest | sub("^sha256:"; "")' "$manifest")"
  local layers=()
  while read -r digest; do
    layer="$work/layer-$i.tar.gz"
    cp "$blobs/${digest#sha256:}" "$layer"
    jq -r --argjson i "$i" '.rootfs.diff_ids[$i]' "$config" >"$layer.diffid"
    layers+=("$layer")
    i=$((i + 1))
  done < <(jq -r '.layers[].digest' "$manifest")
  local source_digest
  source_digest="$(jq -r '.manifests[0].digest' "$work/source/index.json")"
  printf 'livedisk:%s, built by hack/chart-upgrade.sh --rebuild from livedisk:%s (%s)\n' \
    "$TAG" "$current" "$source_digest" >"$work/extra/etc/livedisk/image-build"
  oci_tar_dir "$work/extra" "$work/extra.tar" "$(date +%s)"
  oci_compress_layer "$work/extra.tar" "$work/layer-$i.tar.gz"
  layers+=("$work/layer-$i.tar.gz")
  local history new_digest
  history="$(jq -cS '.history + [{"created_by": "hack/chart-upgrade.sh --rebuild: /etc/livedisk/image-build"}]' "$config")"
  new_digest="$(oci_write_image "$work/layout" "$(oci_containerd_name "livedisk:$TAG")" \
    "$(jq -cS .config "$config")" "$history" "${layers[@]}")"
  local archive="$STATE/images/livedisk_$TAG.oci.tar"
  oci_archive "$work/layout" "$archive" "$(date +%s)"
  echo "livedisk:$TAG $new_digest $archive" >"$work/list"
  local node
  for node in "${nodes[@]}"; do
    hack/node.sh import "$node" "$work/list" >&2
  done
  # The image ID (the config's digest) is what kubelet reports in a container's imageID.
  local image_id
  image_id="$(jq -r .config.digest "$work/layout/blobs/sha256/${new_digest#sha256:}")"
  echo "chart-upgrade: livedisk:$TAG rebuilt from livedisk:$current ($source_digest): manifest $new_digest, image ID $image_id" >&2
  echo "image-id: $image_id"
}

if [ "$REBUILD" = 1 ]; then
  rebuild
else
  for node in "${nodes[@]}"; do
    hack/node.sh exec "$node" -- ctr images tag --force "docker.io/library/livedisk:$current" "docker.io/library/livedisk:$TAG" >/dev/null
  done
fi
echo "chart-upgrade: helm upgrade: image.tag $current -> $TAG" >&2
"$HELM" upgrade livedisk charts/livedisk --namespace livedisk-system --reuse-values --set "image.tag=$TAG" --wait --timeout 5m >/dev/null
