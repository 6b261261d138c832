# shellcheck shell=bash
# Writing OCI images (image-spec v1: layout directory, then an oci-archive tar) byte for byte
# reproducibly. Sourced by hack/images.sh.
#
# Why by hand rather than umoci or buildah: an image here is three small JSON documents (config,
# manifest, index) over layer blobs, and every byte of them must be a function of the inputs.
# umoci 0.4 stamps the current time into the config and history unless each command is told
# otherwise, and compresses layers itself (no `gzip -n` guarantee); buildah adds more. Writing the
# JSON with jq keeps every field visible here. umoci still checks the result: hack/test-images.sh
# unpacks every archive with `umoci unpack`, which verifies each blob against its digest.
#
# Reproducibility rules kept here: tar entries sorted by name, owner 0:0 numeric, every mtime =
# the epoch given, no atime/ctime in pax headers; gzip -n (no name, no time); JSON with sorted
# keys and no timestamps (the optional `created` fields are left out).

OCI_PAX_OPTION='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime'

# A tar of DIR's contents (entries ./...) with fixed owners and mtimes, to OUT.
oci_tar_dir() { # DIR OUT EPOCH
  tar --sort=name --mtime="@$3" --owner=0 --group=0 --numeric-owner --format=pax \
    --pax-option="$OCI_PAX_OPTION" -C "$1" -cf "$2" .
}

oci_sha256() { sha256sum "$1" | cut -d' ' -f1; }

# Moves FILE into LAYOUT's blob store; prints its descriptor {mediaType, digest, size}.
oci_put_blob() { # LAYOUT FILE MEDIATYPE
  local hex size
  hex="$(oci_sha256 "$2")"
  size="$(stat -c %s "$2")"
  mkdir -p "$1/blobs/sha256"
  mv -f "$2" "$1/blobs/sha256/$hex"
  jq -ncS --arg m "$3" --arg d "sha256:$hex" --argjson s "$size" \
    '{mediaType: $m, digest: $d, size: $s}'
}

# Compresses an uncompressed layer tar (gzip -n) to GZ and writes its diff_id (the sha256 of the
# uncompressed tar, as the image config names it) to GZ.diffid.
oci_compress_layer() { # TAR GZ
  gzip -n -6 -c "$1" >"$2.tmp"
  echo "sha256:$(oci_sha256 "$1")" >"$2.diffid.tmp"
  mv -f "$2.tmp" "$2"
  mv -f "$2.diffid.tmp" "$2.diffid"
}

# Writes a one-manifest OCI layout in LAYOUT (which must not exist yet) and prints the manifest
# digest. LAYERS are compressed layer files, each with a LAYER.diffid beside it (from
# oci_compress_layer), bottom first; they are copied, not moved. CONFIG_JSON is the image config's
# `config` object (Env, Entrypoint, ...). NAME is the containerd image name (fully qualified, e.g.
# docker.io/library/livedisk:0.1.0); its tag is the OCI ref name, so that both
# `ctr images import` (which reads io.containerd.image.name) and `umoci --image LAYOUT:TAG` find it.
oci_write_image() { # LAYOUT NAME CONFIG_JSON HISTORY_JSON LAYER...
  local layout="$1" name="$2" config_obj="$3" history="$4"
  shift 4
  local layers='[]' diff_ids='[]' layer desc tmp
  mkdir -p "$layout/blobs/sha256"
  for layer in "$@"; do
    tmp="$layout/blobs/.layer.tmp"
    cp "$layer" "$tmp"
    desc="$(oci_put_blob "$layout" "$tmp" application/vnd.oci.image.layer.v1.tar+gzip)"
    layers="$(jq -cS --argjson d "$desc" '. + [$d]' <<<"$layers")"
    diff_ids="$(jq -cS --arg d "$(cat "$layer.diffid")" '. + [$d]' <<<"$diff_ids")"
  done

  jq -njcS --argjson c "$config_obj" --argjson ids "$diff_ids" --argjson h "$history" \
    '{architecture: "amd64", os: "linux", config: $c,
      rootfs: {type: "layers", diff_ids: $ids}, history: $h}' >"$layout/blobs/.config.tmp"
  local config_desc
  config_desc="$(oci_put_blob "$layout" "$layout/blobs/.config.tmp" application/vnd.oci.image.config.v1+json)"

  local tag="${name##*:}"
  jq -njcS --argjson c "$config_desc" --argjson l "$layers" --arg title "${name%:*}" --arg v "$tag" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: $c, layers: $l,
      annotations: {"org.opencontainers.image.title": $title, "org.opencontainers.image.version": $v}}' \
    >"$layout/blobs/.manifest.tmp"
  local manifest_desc
  manifest_desc="$(oci_put_blob "$layout" "$layout/blobs/.manifest.tmp" application/vnd.oci.image.manifest.v1+json)"

  jq -njcS --argjson m "$manifest_desc" --arg name "$name" --arg tag "$tag" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [$m + {platform: {architecture: "amd64", os: "linux"},
                        annotations: {"io.containerd.image.name": $name,
                                      "org.opencontainers.image.ref.name": $tag}}]}' \
    >"$layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  jq -r .digest <<<"$manifest_desc"
}

# Packs an OCI layout directory into an oci-archive tar (what `ctr images import` reads).
oci_archive() { # LAYOUT OUT EPOCH
  chmod 0755 "$1" "$1/blobs" "$1/blobs/sha256"
  chmod 0644 "$1/oci-layout" "$1/index.json" "$1"/blobs/sha256/*
  oci_tar_dir "$1" "$2.tmp" "$3"
  mv -f "$2.tmp" "$2"
}

# The name containerd (and so the kubelet) gives an image reference: docker.io/ and library/
# added as Docker's reference normalization adds them (sig-storage/x:v1 ->
# docker.io/sig-storage/x:v1, livedisk:0.1.0 -> docker.io/library/livedisk:0.1.0).
oci_containerd_name() { # REF
  local ref="$1" first="${1%%/*}"
  if [[ "$ref" != */* ]]; then
    echo "docker.io/library/$ref"
  elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then
    echo "$ref"
  else
    echo "docker.io/$ref"
  fi
}
