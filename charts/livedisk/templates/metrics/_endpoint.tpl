{{/*
The HTTPS endpoint (/healthz, /readyz, /metrics) of a livedisk container. Usage:
  args:  include "livedisk.metrics.args" (list . <port>)
  env:   include "livedisk.metrics.env" .
  probes: include "livedisk.metrics.probes" (list . <liveness: bool>)
  volumeMounts / volumes: "livedisk.metrics.volumeMount" / "livedisk.metrics.volume"
*/}}
{{- define "livedisk.metrics.tlsDir" -}}
/etc/livedisk/metrics-tls
{{- end }}

{{- define "livedisk.metrics.args" -}}
{{- $root := index . 0 -}}
- --metrics-addr=0.0.0.0:{{ index . 1 }}
{{- if $root.Values.metrics.tlsSecret }}
- --metrics-tls-dir={{ include "livedisk.metrics.tlsDir" $root }}
{{- end }}
{{- end }}

{{- define "livedisk.metrics.env" -}}
- name: LIVEDISK_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end }}

{{- define "livedisk.metrics.probes" -}}
{{- if index . 1 -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
    scheme: HTTPS
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
{{ end -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
    scheme: HTTPS
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end }}

{{- define "livedisk.metrics.volumeMount" -}}
{{- if .Values.metrics.tlsSecret -}}
- name: metrics-tls
  mountPath: {{ include "livedisk.metrics.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "livedisk.metrics.volume" -}}
{{- if .Values.metrics.tlsSecret -}}
- name: metrics-tls
  secret:
    secretName: {{ .Values.metrics.tlsSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
