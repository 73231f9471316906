{{/* The release's base name: the release name, with "-scaleout" unless it already says so. */}}
{{- define "scaleout.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "scaleout.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "scaleout.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "scaleout.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Names of the Services and Secrets, in one place. */}}
{{- define "scaleout.controllerService" -}}{{ include "scaleout.fullname" . }}-controller{{- end -}}
{{- define "scaleout.combinerService" -}}{{ include "scaleout.fullname" . }}-combiner{{- end -}}
{{- define "scaleout.postgresqlService" -}}{{ include "scaleout.fullname" . }}-postgresql{{- end -}}

{{- define "scaleout.storeSecret" -}}
{{- .Values.store.existingSecret | default (printf "%s-store" (include "scaleout.fullname" .)) -}}
{{- end -}}
{{- define "scaleout.keySecret" -}}
{{- .Values.keyFile.existingSecret | default (printf "%s-key" (include "scaleout.fullname" .)) -}}
{{- end -}}
{{- define "scaleout.tokensSecret" -}}
{{- .Values.tokens.existingSecret | default (printf "%s-tokens" (include "scaleout.fullname" .)) -}}
{{- end -}}

{{/* The combiner names a combiner join token must allow (--san), one per possible replica. */}}
{{- define "scaleout.combinerSans" -}}
{{- $svc := include "scaleout.combinerService" . -}}
{{- $n := max (int .Values.combiner.replicas) (int .Values.combiner.maxReplicas) -}}
{{- range $i := until (int $n) -}}
{{ printf " --san %s-%d.%s.%s.svc" $svc $i $svc $.Release.Namespace }}
{{- end -}}
{{- end -}}
