{{/*
Names and labels, as well-kept charts write them. Every helper takes the chart's root
context: the chart's own templates pass `.`, an ISV chart passes this chart's scope
(`index .Subcharts "metering-gateway"`) to the sidecar templates.
*/}}

{{- define "metering-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "metering-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "metering-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "metering-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metering-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "metering-gateway.labels" -}}
helm.sh/chart: {{ include "metering-gateway.chart" . }}
{{ include "metering-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metering-gateway
{{- end }}

{{- define "metering-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metering-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "metering-gateway.image" -}}
{{- $repository := required "image.repository is required: where your copy of the image lives (make image, then push it), e.g. <ACCOUNT_ID>.dkr.ecr.<REGION>.amazonaws.com/metering-gateway" .Values.image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The gRPC port: fixed, as the image's ENV and the callers' habits say. */}}
{{- define "metering-gateway.grpcPort" -}}50051{{- end }}

{{/* Where the SQLite spool lives: the StatefulSet's claim is mounted on its folder. */}}
{{- define "metering-gateway.sqliteDir" -}}/var/lib/metering-gateway{{- end }}

{{/* The platform's wait: the drain grace, the preStop sleep, and a margin well above the second the exit may take. */}}
{{- define "metering-gateway.terminationGracePeriodSeconds" -}}
{{- add (int .Values.grace) (int .Values.preStopSeconds) 10 }}
{{- end }}

{{- define "metering-gateway.authzConfigMap" -}}
{{- default (printf "%s-authz" (include "metering-gateway.fullname" .)) .Values.authz.existingConfigMap }}
{{- end }}

{{- define "metering-gateway.registerUsageConfigMap" -}}
{{- default (printf "%s-register-usage" (include "metering-gateway.fullname" .)) .Values.registerUsage.existingConfigMap }}
{{- end }}

{{- define "metering-gateway.hasPublicKey" -}}
{{- if or .Values.registerUsage.publicKey .Values.registerUsage.existingConfigMap }}true{{- end }}
{{- end }}

{{- define "metering-gateway.hasAuthz" -}}
{{- if or .Values.authz.policy .Values.authz.existingConfigMap }}true{{- end }}
{{- end }}

{{/*
Combinations the schema cannot refuse, each with one line saying what to do. Every
template of the chart includes it, so `helm template` fails before rendering anything.
*/}}
{{- define "metering-gateway.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.mode "shared") (eq $v.spool.type "sqlite") }}
{{- fail "spool.type sqlite is one pod's file: use mode single (a StatefulSet of one pod), or spool.type postgres to share a spool between replicas" }}
{{- end }}
{{- if and (eq $v.mode "single") (ne $v.spool.type "sqlite") }}
{{- fail "mode single runs one pod for its SQLite spool: set spool.type sqlite, or use mode shared (spool.type none or postgres)" }}
{{- end }}
{{- if and (eq $v.mode "sidecar") (ne $v.spool.type "none") }}
{{- fail "mode sidecar keeps no spool (a sidecar's pod comes and goes): set spool.type none, and run RecordUsage in a mode shared release" }}
{{- end }}
{{- if and (eq $v.spool.type "postgres") (not $v.spool.postgres.existingSecret) }}
{{- fail "spool.type postgres needs spool.postgres.existingSecret: a Secret holding the DSN (key dsn) and the password (key password), see docs/deploy.md" }}
{{- end }}
{{- if and (eq $v.spool.type "sqlite") (gt (int $v.processes) 1) }}
{{- fail "processes must be 1 with spool.type sqlite: one sender per SQLite file" }}
{{- end }}
{{- if and $v.zeroUsageHours (eq $v.spool.type "none") }}
{{- fail "zeroUsageHours are recorded usage: they need a spool (spool.type postgres or sqlite)" }}
{{- end }}
{{- if eq $v.mode "shared" }}
{{- if le (int $v.replicaCount) (int $v.pdb.minAvailable) }}
{{- fail (printf "replicaCount %d must be above pdb.minAvailable %d, or no node drain can evict a replica" (int $v.replicaCount) (int $v.pdb.minAvailable)) }}
{{- end }}
{{- end }}
{{- if and $v.registerUsage.productCode (lt (int $v.registerUsage.keyVersion) 1) }}
{{- fail "registerUsage.productCode needs registerUsage.keyVersion: the public key version AWS Marketplace gave you (1 or more)" }}
{{- end }}
{{- if and (include "metering-gateway.hasPublicKey" .) (not $v.registerUsage.productCode) }}
{{- fail "registerUsage.publicKey (or existingConfigMap) needs registerUsage.productCode" }}
{{- end }}
{{- if and (eq $v.mode "sidecar") (not $v.registerUsage.productCode) }}
{{- fail "mode sidecar is RegisterUsage in every paid pod: set registerUsage.productCode and registerUsage.keyVersion" }}
{{- end }}
{{- if and (include "metering-gateway.hasAuthz" .) (not (and $v.tls.secretName $v.tls.clientCA)) }}
{{- fail "authz.policy names callers by their client certificate: it needs mTLS (tls.secretName, with tls.clientCA true)" }}
{{- end }}
{{- if and $v.metrics.podMonitor.enabled (not $v.metrics.enabled) }}
{{- fail "metrics.podMonitor.enabled needs metrics.enabled: there is no metrics port to scrape" }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled: there is no metrics port to scrape" }}
{{- end }}
{{- if and $v.metrics.podMonitor.enabled $v.metrics.serviceMonitor.enabled }}
{{- fail "metrics.podMonitor.enabled and metrics.serviceMonitor.enabled would scrape every pod twice (duplicate series, doubled sums in the alerts): enable one of them" }}
{{- end }}
{{- if and $v.sidecarExample.enabled (ne $v.mode "sidecar") }}
{{- fail "sidecarExample.enabled renders the sidecar template: it needs mode sidecar" }}
{{- end }}
{{- end }}
