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

{{/*
A name made of the full name and a suffix (-headless, -metrics, -authz ...): the full
name is cut so that the whole stays a 63-character DNS label.
Takes (dict "root" <the chart's context> "suffix" "-headless").
*/}}
{{- define "metering-gateway.suffixedName" -}}
{{- $base := include "metering-gateway.fullname" .root | trunc (int (sub 63 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $base .suffix }}
{{- end }}

{{/* The StatefulSet's name: 52 characters at most, or its pods' controller-revision-hash
label (NAME-<10-character hash>) would be longer than a label's 63. */}}
{{- define "metering-gateway.statefulSetName" -}}
{{- include "metering-gateway.fullname" . | trunc 52 | trimSuffix "-" }}
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
{{- default (include "metering-gateway.suffixedName" (dict "root" . "suffix" "-authz")) .Values.authz.existingConfigMap }}
{{- end }}

{{- define "metering-gateway.registerUsageConfigMap" -}}
{{- default (include "metering-gateway.suffixedName" (dict "root" . "suffix" "-register-usage")) .Values.registerUsage.existingConfigMap }}
{{- end }}

{{- define "metering-gateway.hasPublicKey" -}}
{{- if or .Values.registerUsage.publicKey .Values.registerUsage.existingConfigMap }}true{{- end }}
{{- end }}

{{- define "metering-gateway.hasAuthz" -}}
{{- if or .Values.authz.policy .Values.authz.existingConfigMap }}true{{- end }}
{{- end }}

{{/*
PRODUCT=DIMENSION[,DIMENSION...] entries separated by ';' (or new lines), as the
gateway's parse_products reads them, as JSON: {"PRODUCT": ["DIMENSION", ...]}. An entry
without '=' is left out: the gateway refuses it at start-up with its own message.
*/}}
{{- define "metering-gateway.parseProducts" -}}
{{- $out := dict }}
{{- range $entry := regexSplit "[;\n]" . -1 }}
{{- $parts := regexSplit "=" $entry 2 }}
{{- if eq (len $parts) 2 }}
{{- $dimensions := list }}
{{- range splitList "," (index $parts 1) }}
{{- if trim . }}
{{- $dimensions = append $dimensions (trim .) }}
{{- end }}
{{- end }}
{{- $_ := set $out (trim (index $parts 0)) $dimensions }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Keys of the pods' labels and annotations the chart sets itself. */}}
{{- define "metering-gateway.ownPodKeys" -}}
{{- $labels := include "metering-gateway.labels" . | fromYaml }}
{{- $annotations := list "checksum/config" "prometheus.io/scrape" "prometheus.io/port" "prometheus.io/path" }}
{{- toJson (dict "labels" (keys $labels | sortAlpha) "annotations" $annotations) }}
{{- end }}

{{/*
Combinations the schema cannot refuse, each with one line saying what to do. Every
template of the chart includes it, so `helm template` fails before rendering anything.
*/}}
{{- define "metering-gateway.validate" -}}
{{- $v := .Values }}
{{- if and $v.registerUsage.productCode (ne $v.mode "sidecar") }}
{{- fail "registerUsage.productCode needs mode sidecar: RegisterUsage registers (and bills per pod-hour) the pod that calls it, so only your product's own pods may call it, through the sidecar template (docs/deploy.md); mode shared and single never register" }}
{{- end }}
{{- if and (or (eq $v.mode "sidecar") $v.registerUsage.productCode) (gt (int $v.processes) 1) }}
{{- fail "processes must be 1 in mode sidecar: RegisterUsage is called once per pod, and the gateway refuses --register-usage with --processes above 1" }}
{{- end }}
{{- if and (eq $v.mode "sidecar") $v.metrics.prometheusRule.enabled }}
{{- fail "metrics.prometheusRule.enabled needs a PodMonitor or ServiceMonitor of this chart, and mode sidecar has none (the gateway is in your pods): its MeteringGatewayAbsent alert would fire for ever. Copy files/prometheus-rules.yaml into your chart and set job=\"...\" in its expressions to your own scrape job" }}
{{- end }}
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
{{- if and $v.products $v.zeroUsageHours }}
{{- $known := include "metering-gateway.parseProducts" $v.products | fromJson }}
{{- range $product, $dimensions := include "metering-gateway.parseProducts" $v.zeroUsageHours | fromJson }}
{{- if not (hasKey $known $product) }}
{{- fail (printf "zeroUsageHours names product %s, which products does not list: the gateway would refuse to start (add it to products, or drop it from zeroUsageHours)" $product) }}
{{- end }}
{{- range $dimensions }}
{{- if not (has . (index $known $product)) }}
{{- fail (printf "zeroUsageHours names %s=%s, a dimension products does not list for %s: the gateway would refuse to start (add it to products, or drop it from zeroUsageHours)" $product . $product) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $own := include "metering-gateway.ownPodKeys" . | fromJson }}
{{- range $own.labels }}
{{- if hasKey (default dict $v.podLabels) . }}
{{- fail (printf "podLabels.%s is a label the chart sets itself (the selectors use the app.kubernetes.io/* ones): leave it out" .) }}
{{- end }}
{{- end }}
{{- range $own.annotations }}
{{- if hasKey (default dict $v.podAnnotations) . }}
{{- fail (printf "podAnnotations.%s is an annotation the chart sets itself (metrics.enabled and metrics.port decide the prometheus.io/* ones): leave it out" .) }}
{{- end }}
{{- end }}
{{- if and $v.sidecarExample.enabled (ne $v.mode "sidecar") }}
{{- fail "sidecarExample.enabled renders the sidecar template: it needs mode sidecar" }}
{{- end }}
{{- end }}
