{{/* Names and labels shared by the templates. */}}
{{- define "promvae.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "promvae.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "promvae.labels" -}}
{{ include "promvae.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Series per shard, rounded up. */}}
{{- define "promvae.seriesPerShard" -}}
{{- $shards := int .Values.shards -}}
{{- div (add (int .Values.expectedSeries) (sub $shards 1)) $shards -}}
{{- end -}}

{{/* Memory request in Mi: base + perSeries x series per shard. */}}
{{- define "promvae.memoryMi" -}}
{{- $series := int (include "promvae.seriesPerShard" .) -}}
{{- add (int .Values.memory.baseMi) (div (add (mul $series (int .Values.memory.perSeriesKi)) 1023) 1024) -}}
{{- end -}}

{{- define "promvae.webSecret" -}}
{{- if .Values.webConfig.existingSecret -}}
{{- .Values.webConfig.existingSecret -}}
{{- else if .Values.webConfig.content -}}
{{- printf "%s-web" (include "promvae.fullname" .) -}}
{{- end -}}
{{- end -}}
