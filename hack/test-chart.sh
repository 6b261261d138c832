#!/usr/bin/env bash
# Test the Helm chart charts/livedisk:
#   1. helm lint --strict, for the default values and every charts/livedisk/ci/*-values.yaml
#   2. helm template for the same values sets (+ a structural check of every rendered object,
#      + values that must be rejected are rejected with their message)
#   3. a server-side dry run of every rendered object against the API server of $KUBECONFIG:
#      the target namespace is created, the livedisk CRDs from charts/livedisk/crds/ (if any)
#      are applied server-side first, then `kubectl apply --dry-run=server` on each rendering.
#      The cluster must already serve the snapshot.storage.k8s.io, groupsnapshot.storage.k8s.io,
#      cbt.storage.k8s.io and CDI's cdi.kubevirt.io CRDs (hack/cluster.sh installs them).
#
# Usage: hack/test-chart.sh [--offline]
#   --offline   skip step 3 (says so); without it, an unreachable API server is a failure.
# Env:
#   KUBECONFIG                 the cluster for step 3 (default: ./.livedisk/kubeconfig if it exists)
#   KUBECTL                    kubectl binary (default: kubectl on PATH)
#   LIVEDISK_CHART_NAMESPACE   namespace of the release in step 3 (default: livedisk-chart-test;
#                              deleted afterwards if this script created it)
#   LIVEDISK_CHART_RELEASE     release name (default: livedisk)
# Exit status: 0 when every step that ran passed (and step 3 ran, unless --offline).
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$REPO_ROOT/charts/livedisk"
OFFLINE=0
for arg in "$@"; do
    case "$arg" in
        --offline) OFFLINE=1 ;;
        -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "test-chart: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

NAMESPACE="${LIVEDISK_CHART_NAMESPACE:-livedisk-chart-test}"
RELEASE="${LIVEDISK_CHART_RELEASE:-livedisk}"
KUBECTL="${KUBECTL:-kubectl}"
if [[ -z "${KUBECONFIG:-}" && -f "$REPO_ROOT/.livedisk/kubeconfig" ]]; then
    export KUBECONFIG="$REPO_ROOT/.livedisk/kubeconfig"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/livedisk-chart.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

PASSED=()
FAILED=()
SKIPPED=()
log() { printf 'test-chart: %s\n' "$*" >&2; }
pass() { PASSED+=("$1"); printf 'PASS  %s\n' "$1"; }
fail() {
    FAILED+=("$1"); printf 'FAIL  %s\n' "$1"
    if [[ -n "${2:-}" && -s "$2" ]]; then sed 's/^/      | /' "$2" | tail -n 40; fi
}
skip() { SKIPPED+=("$1"); printf 'SKIP  %s\n' "$1"; }

HELM="$("$REPO_ROOT/hack/helm.sh" | tail -n 1)" || { echo "FAIL  hack/helm.sh could not provide helm"; exit 1; }
[[ -x "$HELM" ]] || { echo "FAIL  hack/helm.sh printed '$HELM', which is not executable"; exit 1; }
log "helm: $HELM ($("$HELM" version --template '{{.Version}}'))"

# Values sets: "default" plus every ci/*-values.yaml.
SETS=(default)
for f in "$CHART"/ci/*-values.yaml; do
    [[ -f "$f" ]] && SETS+=("$(basename "$f" -values.yaml)")
done
values_args() { [[ "$1" == default ]] && return 0; printf '%s\n' -f "$CHART/ci/$1-values.yaml"; }

# --- 1 + 2: lint and template ---------------------------------------------------------------
for set in "${SETS[@]}"; do
    mapfile -t VARGS < <(values_args "$set")
    if "$HELM" lint --strict "$CHART" "${VARGS[@]}" >"$WORK/lint-$set.log" 2>&1; then
        pass "helm lint --strict ($set values)"
    else
        fail "helm lint --strict ($set values)" "$WORK/lint-$set.log"
    fi
    if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${VARGS[@]}" \
        >"$WORK/template-$set.yaml" 2>"$WORK/template-$set.log"; then
        n="$(grep -c '^kind:' "$WORK/template-$set.yaml" || true)"
        pass "helm template ($set values): $n objects"
    else
        fail "helm template ($set values)" "$WORK/template-$set.log"
        continue
    fi
    # Structure: every document has apiVersion, kind, metadata.name; names are unique per kind
    # and namespace; every namespaced object is in the release namespace.
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import yaml' >/dev/null 2>&1; then
        if python3 - "$WORK/template-$set.yaml" "$NAMESPACE" >"$WORK/struct-$set.log" 2>&1 <<'PY'
import sys, yaml
path, ns = sys.argv[1], sys.argv[2]
cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass",
                  "VolumeSnapshotClass", "VolumeGroupSnapshotClass", "SnapshotMetadataService",
                  "Namespace", "CustomResourceDefinition", "PriorityClass", "StorageProfile"}
seen, errors = set(), []
docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
for d in docs:
    kind, meta = d.get("kind"), d.get("metadata") or {}
    if not d.get("apiVersion") or not kind or not meta.get("name"):
        errors.append(f"object without apiVersion/kind/metadata.name: {str(d)[:120]}")
        continue
    if kind in cluster_scoped:
        if "namespace" in meta:
            errors.append(f"{kind}/{meta['name']}: cluster-scoped object with a namespace")
    elif meta.get("namespace") != ns:
        errors.append(f"{kind}/{meta['name']}: namespace {meta.get('namespace')!r}, want {ns!r}")
    key = (kind, meta.get("namespace"), meta["name"])
    if key in seen:
        errors.append(f"duplicate {kind}/{meta['name']}")
    seen.add(key)
    labels = meta.get("labels") or {}
    for l in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"):
        if l not in labels:
            errors.append(f"{kind}/{meta['name']}: label {l} missing")
    spec = (d.get("spec") or {}).get("template", {}).get("spec")
    if spec:
        for c in spec.get("containers", []):
            if "resources" not in c:
                errors.append(f"{kind}/{meta['name']}: container {c['name']} has no resources")
print(f"{len(docs)} documents checked")
for e in errors:
    print("error:", e)
sys.exit(1 if errors else 0)
PY
        then
            pass "rendered objects well-formed ($set values)"
        else
            fail "rendered objects well-formed ($set values)" "$WORK/struct-$set.log"
        fi
    fi
done

# The chart passes only flags and variables the livedisk binaries read (their --help), for every
# values set: an unknown flag stops a container, an unknown variable is silently ignored.
BIN_DIR="${LIVEDISK_BIN_DIR:-$REPO_ROOT/target/debug}"
if [[ -x "$BIN_DIR/livedisk-csi" && -x "$BIN_DIR/livedisk-operator" ]]; then
    for set in "${SETS[@]}"; do
        [[ -f "$WORK/template-$set.yaml" ]] || continue
        if python3 "$REPO_ROOT/hack/lib/chart-flags.py" "$WORK/template-$set.yaml" "$BIN_DIR" >"$WORK/flags-$set.log" 2>&1; then
            pass "flags and env of the livedisk containers exist in the binaries ($set values)"
        else
            fail "flags and env of the livedisk containers exist in the binaries ($set values)" "$WORK/flags-$set.log"
        fi
    done
else
    fail "flags and env check: no livedisk binaries in $BIN_DIR (cargo build --workspace --bins, or set LIVEDISK_BIN_DIR)"
fi

# Values that must be refused, with a message naming the fix.
expect_refused() { # name expected-message helm-args...
    local name="$1" want="$2"; shift 2
    if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" >/dev/null 2>"$WORK/refused.log"; then
        fail "refused: $name (rendered without error)"
    elif grep -q -- "$want" "$WORK/refused.log"; then
        pass "refused: $name"
    else
        fail "refused: $name (wrong message, want '$want')" "$WORK/refused.log"
    fi
}
expect_refused "node gRPC server secret without client secret" "must be set together" \
    --set nodeGrpc.tls.existingServerSecret=mine
expect_refused "snapshot-metadata existingSecret without caCert" "snapshotMetadata.tls.caCert" \
    --set snapshotMetadata.tls.existingSecret=mine
expect_refused "misspelled value (values.schema.json)" "additional properties 'operater'" \
    --set operater.replicas=2
expect_refused "bad enum value (values.schema.json)" "storageClass/fsType" \
    --set storageClass.fsType=btrfs

# --- 3: server-side dry run -------------------------------------------------------------------
dry_run() {
    if ! command -v "$KUBECTL" >/dev/null 2>&1; then
        fail "server dry run: kubectl ('$KUBECTL') not found"
        return
    fi
    if [[ -z "${KUBECONFIG:-}" ]]; then
        fail "server dry run: KUBECONFIG is not set (start the local cluster: hack/cluster.sh up, or pass --offline)"
        return
    fi
    if ! "$KUBECTL" get --raw /readyz >"$WORK/readyz.log" 2>&1; then
        fail "server dry run: the API server of KUBECONFIG=$KUBECONFIG is not reachable/ready (pass --offline to skip)" "$WORK/readyz.log"
        return
    fi
    log "API server: $("$KUBECTL" config view --minify -o jsonpath='{.clusters[0].cluster.server}' 2>/dev/null)"

    # Prerequisite CRDs that the cluster (not this chart) provides.
    local crd missing=()
    for crd in volumesnapshotclasses.snapshot.storage.k8s.io snapshotmetadataservices.cbt.storage.k8s.io \
        volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io; do
        "$KUBECTL" get crd "$crd" >/dev/null 2>&1 || missing+=("$crd")
    done
    if ((${#missing[@]})); then
        log "warning: the cluster lacks CRDs ${missing[*]}; objects of those kinds will fail the dry run"
    fi

    # Livedisk CRDs shipped with the chart (generated; applied for real, server-side).
    local crds=()
    if [[ -d "$CHART/crds" ]]; then
        mapfile -t crds < <(find "$CHART/crds" -maxdepth 1 -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
    fi
    if ((${#crds[@]})); then
        local args=() c
        for c in "${crds[@]}"; do args+=(-f "$c"); done
        if "$KUBECTL" apply --server-side --force-conflicts --field-manager=livedisk-chart-test "${args[@]}" \
            >"$WORK/crds.log" 2>&1 \
            && "$KUBECTL" wait --for condition=Established --timeout=60s "${args[@]}" >>"$WORK/crds.log" 2>&1; then
            pass "livedisk CRDs applied server-side and Established (${#crds[@]} files)"
        else
            fail "livedisk CRDs applied server-side" "$WORK/crds.log"
        fi
    else
        skip "livedisk CRDs: $CHART/crds has none yet"
    fi

    local created_ns=0
    if ! "$KUBECTL" get namespace "$NAMESPACE" >/dev/null 2>&1; then
        if "$KUBECTL" create namespace "$NAMESPACE" >"$WORK/ns.log" 2>&1; then
            created_ns=1
        else
            fail "server dry run: create namespace $NAMESPACE" "$WORK/ns.log"
            return
        fi
    fi

    # Render again with the API versions the cluster serves, so auto-detected versions
    # (cbt.storage.k8s.io, groupsnapshot.storage.k8s.io) match this cluster.
    local api_args=() gv
    while read -r gv; do [[ -n "$gv" ]] && api_args+=(--api-versions "$gv"); done \
        < <("$KUBECTL" api-versions 2>/dev/null)
    local set
    for set in "${SETS[@]}"; do
        mapfile -t VARGS < <(values_args "$set")
        local out="$WORK/server-$set.yaml"
        if ! "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${api_args[@]}" "${VARGS[@]}" \
            >"$out" 2>"$WORK/server-template-$set.log"; then
            fail "server dry run ($set values): helm template with the cluster's API versions" "$WORK/server-template-$set.log"
            continue
        fi
        local want got
        want="$(grep -c '^kind:' "$out" || true)"
        if "$KUBECTL" apply --dry-run=server --validate=strict -f "$out" >"$WORK/dry-$set.log" 2>&1; then
            got="$(grep -c 'server dry run' "$WORK/dry-$set.log" || true)"
            if [[ "$got" == "$want" ]]; then
                pass "kubectl apply --dry-run=server ($set values): $got/$want objects accepted"
            else
                fail "kubectl apply --dry-run=server ($set values): $got/$want objects accepted" "$WORK/dry-$set.log"
            fi
        else
            fail "kubectl apply --dry-run=server ($set values)" "$WORK/dry-$set.log"
        fi
    done

    if ((created_ns)); then
        "$KUBECTL" delete namespace "$NAMESPACE" --wait=false >/dev/null 2>&1 || true
    fi
}

if ((OFFLINE)); then
    skip "server-side dry run NOT done (--offline)"
else
    dry_run
fi

# --- summary ----------------------------------------------------------------------------------
echo
for f in "${FAILED[@]}"; do echo "  failed: $f"; done
for s in "${SKIPPED[@]}"; do echo "  skipped: $s"; done
rc=0
if ((${#FAILED[@]})); then
    echo "RESULT: FAIL"
    rc=1
elif ((OFFLINE)); then
    echo "RESULT: PASS (offline: the server-side dry run was not done)"
else
    echo "RESULT: PASS"
fi
echo "chart-test: ${#PASSED[@]} passed, ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped"
exit "$rc"
