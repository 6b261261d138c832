{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "livedisk.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, the prefix of every object name. Truncated so that the longest suffix
this chart appends ("-snapshot-metadata-tls", 22 characters) still fits in 63 characters.
*/}}
{{- define "livedisk.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value: name-version.
*/}}
{{- define "livedisk.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels on every object.
*/}}
{{- define "livedisk.labels" -}}
helm.sh/chart: {{ include "livedisk.chart" . }}
{{ include "livedisk.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: livedisk
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels shared by all components; each component adds app.kubernetes.io/component.
*/}}
{{- define "livedisk.selectorLabels" -}}
app.kubernetes.io/name: {{ include "livedisk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component. Usage: include "livedisk.componentLabels" (list . "operator")
*/}}
{{- define "livedisk.componentLabels" -}}
{{ include "livedisk.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Selector labels of one component. Usage: include "livedisk.componentSelectorLabels" (list . "operator")
*/}}
{{- define "livedisk.componentSelectorLabels" -}}
{{ include "livedisk.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Object names of the components.
*/}}
{{- define "livedisk.operator.fullname" -}}
{{- printf "%s-operator" (include "livedisk.fullname" .) }}
{{- end }}
{{- define "livedisk.csiController.fullname" -}}
{{- printf "%s-csi-controller" (include "livedisk.fullname" .) }}
{{- end }}
{{- define "livedisk.node.fullname" -}}
{{- printf "%s-node" (include "livedisk.fullname" .) }}
{{- end }}
{{- define "livedisk.engine.fullname" -}}
{{- printf "%s-engine" (include "livedisk.fullname" .) }}
{{- end }}
{{- define "livedisk.snapshotMetadata.serviceName" -}}
{{- printf "%s-snapshot-metadata" (include "livedisk.fullname" .) }}
{{- end }}
{{- define "livedisk.snapshotMetadata.secretName" -}}
{{- default (printf "%s-snapshot-metadata-tls" (include "livedisk.fullname" .)) .Values.snapshotMetadata.tls.existingSecret }}
{{- end }}
{{- define "livedisk.nodeGrpc.serviceName" -}}
{{- printf "%s-node-grpc" (include "livedisk.fullname" .) }}
{{- end }}
{{- define "livedisk.nodeGrpc.serverSecretName" -}}
{{- default (printf "%s-node-grpc-server" (include "livedisk.fullname" .)) .Values.nodeGrpc.tls.existingServerSecret }}
{{- end }}
{{- define "livedisk.nodeGrpc.clientSecretName" -}}
{{- default (printf "%s-node-grpc-client" (include "livedisk.fullname" .)) .Values.nodeGrpc.tls.existingClientSecret }}
{{- end }}

{{/*
Images.
*/}}
{{- define "livedisk.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- define "livedisk.engineImage" -}}
{{- printf "%s:%s" .Values.engine.image.repository (default .Chart.AppVersion .Values.engine.image.tag) }}
{{- end }}
{{/*
Sidecar image. Usage: include "livedisk.sidecarImage" (list . .Values.sidecars.provisioner)
*/}}
{{- define "livedisk.sidecarImage" -}}
{{- $root := index . 0 }}
{{- $s := index . 1 }}
{{- if $root.Values.sidecars.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" $root.Values.sidecars.registry) $s.repository $s.tag }}
{{- else }}
{{- printf "%s:%s" $s.repository $s.tag }}
{{- end }}
{{- end }}

{{/*
imagePullSecrets block for a pod spec.
*/}}
{{- define "livedisk.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  {{- if kindIs "string" . }}
  - name: {{ . }}
  {{- else }}
  - {{ toYaml . | nindent 4 | trim }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Path of the CSI socket directory on the host for the node plugin (kubelet's plugin dir).
*/}}
{{- define "livedisk.node.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName }}
{{- end }}

{{/*
Audience of the SnapshotMetadataService.
*/}}
{{- define "livedisk.snapshotMetadata.audience" -}}
{{- default .Values.driverName .Values.snapshotMetadata.audience }}
{{- end }}

{{/*
API version of the SnapshotMetadataService (cbt.storage.k8s.io).
*/}}
{{- define "livedisk.snapshotMetadata.apiVersion" -}}
{{- $v := .Values.snapshotMetadata.apiVersion }}
{{- if $v }}
{{- if contains "/" $v }}{{ $v }}{{ else }}{{ printf "cbt.storage.k8s.io/%s" $v }}{{ end }}
{{- else }}
{{- $found := "" }}
{{- range list "v1beta1" "v1alpha1" }}
{{- $gv := printf "cbt.storage.k8s.io/%s" . }}
{{- if and (not $found) (or ($.Capabilities.APIVersions.Has (printf "%s/SnapshotMetadataService" $gv)) ($.Capabilities.APIVersions.Has $gv)) }}
{{- $found = $gv }}
{{- end }}
{{- end }}
{{- default "cbt.storage.k8s.io/v1beta1" $found }}
{{- end }}
{{- end }}

{{/*
API version of groupsnapshot.storage.k8s.io.
*/}}
{{- define "livedisk.groupSnapshot.apiVersion" -}}
{{- $v := .Values.groupSnapshot.apiVersion }}
{{- if $v }}
{{- if contains "/" $v }}{{ $v }}{{ else }}{{ printf "groupsnapshot.storage.k8s.io/%s" $v }}{{ end }}
{{- else }}
{{- $found := "" }}
{{- range list "v1" "v1beta2" "v1beta1" }}
{{- $gv := printf "groupsnapshot.storage.k8s.io/%s" . }}
{{- if and (not $found) (or ($.Capabilities.APIVersions.Has (printf "%s/VolumeGroupSnapshotClass" $gv)) ($.Capabilities.APIVersions.Has $gv)) }}
{{- $found = $gv }}
{{- end }}
{{- end }}
{{- default "groupsnapshot.storage.k8s.io/v1" $found }}
{{- end }}
{{- end }}

{{/*
Common container security context for the non-privileged sidecars.
*/}}
{{- define "livedisk.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}
