{{/* Labels of every object; selectors use only name and component. */}}
{{- define "elasti.labels" -}}
app.kubernetes.io/name: elasti-istio
app.kubernetes.io/part-of: elasti-istio
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "elasti.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The rules of one role of the kustomize base (files/ holds copies of deploy/kustomize/base/rbac-*.yaml),
so that the chart and the kustomize manifests grant exactly the same. Called with (list $ file kind name).
*/}}
{{- define "elasti.rules" -}}
{{- $root := index . 0 -}}
{{- $file := index . 1 -}}
{{- $kind := index . 2 -}}
{{- $name := index . 3 -}}
{{- $found := false -}}
{{- range $doc := splitList "\n---" ($root.Files.Get $file) -}}
{{- $obj := fromYaml $doc -}}
{{- if and $obj.kind (eq $obj.kind $kind) (eq $obj.metadata.name $name) -}}
{{- toYaml $obj.rules -}}
{{- $found = true -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "%s %s not found in %s" $kind $name $file) -}}
{{- end -}}
{{- end }}

{{- define "elasti.drainTimeout" -}}
{{ int .Values.activator.drainTimeoutSeconds }}
{{- end }}

{{/*
The pods' image pull secrets, node selector, tolerations and affinity, from imagePullSecrets and the
component's values. Called with (list $ "controller"|"activator").
*/}}
{{- define "elasti.podPlacement" -}}
{{- $root := index . 0 -}}
{{- $values := index $root.Values (index . 1) -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
--log-level and --log-format where they differ from the programs' defaults (info, text), then the
component's extraArgs. Called with the component's values.
*/}}
{{- define "elasti.args" -}}
{{- if ne .logLevel "info" }}
- --log-level={{ .logLevel }}
{{- end }}
{{- if ne .logFormat "text" }}
- --log-format={{ .logFormat }}
{{- end }}
{{- range .extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
