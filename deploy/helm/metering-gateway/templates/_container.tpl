{{/*
The gateway container and the volumes it mounts: ONE definition for the Deployment, the
StatefulSet and the sidecar, so that they cannot drift apart.
Takes (dict "root" <the chart's context> "sidecar" <bool>).
*/}}

{{/* A sidecar shares its pod with the ISV's containers: its volume names carry a prefix. */}}
{{- define "metering-gateway.volumePrefix" -}}
{{- if .sidecar }}metering-gateway-{{ end }}
{{- end }}

{{/* A probe's handler: kubelet's gRPC probe on the pod's IP, or, where that cannot work
(TLS: kubelet speaks plaintext; the sidecar: it listens on loopback only), the image's
own `metering-gateway health`, which dials the loopback end of METERING_GATEWAY_LISTEN. */}}
{{- define "metering-gateway.probe" -}}
{{- $root := .root }}
{{- if or .sidecar $root.Values.tls.secretName }}
exec:
  command: ["metering-gateway", "health", "--service", {{ .service | quote }}, "--timeout", "3s"]
timeoutSeconds: 5
{{- else }}
grpc:
  port: {{ include "metering-gateway.grpcPort" $root }}
  service: {{ .service | quote }}
{{- end }}
{{- toYaml .timing | nindent 0 }}
{{- end }}

{{- define "metering-gateway.container" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $prefix := include "metering-gateway.volumePrefix" . }}
{{- $port := include "metering-gateway.grpcPort" $root }}
{{- /* The metrics port: metrics.port with metrics.enabled; in the sidecar only
metrics.sidecarPort (0: none), a port the ISV picks free in its own pod. */}}
{{- $metricsPort := 0 }}
{{- if .sidecar }}
{{- $metricsPort = int $v.metrics.sidecarPort }}
{{- else if $v.metrics.enabled }}
{{- $metricsPort = int $v.metrics.port }}
{{- end }}
{{- /* resources, with limits.memory computed from processes unless it is given: 128Mi
per server process plus 192Mi for two `metering-gateway health` probe runs at once. */}}
{{- $resources := deepCopy (default dict $v.resources) }}
{{- $limits := dict }}
{{- if $resources.limits }}
{{- $limits = $resources.limits }}
{{- end }}
{{- if not (hasKey $limits "memory") }}
{{- $_ := set $limits "memory" (printf "%dMi" (add 192 (mul 128 (int $v.processes)))) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
- name: {{ if .sidecar }}metering-gateway{{ else }}gateway{{ end }}
  image: {{ include "metering-gateway.image" $root | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if or (not .sidecar) $metricsPort }}
  ports:
    {{- if not .sidecar }}
    - name: grpc
      containerPort: {{ $port }}
      protocol: TCP
    {{- end }}
    {{- if $metricsPort }}
    # Prometheus metrics (/metrics); never exposed through a Service.
    - name: {{ if .sidecar }}gw-metrics{{ else }}metrics{{ end }}
      containerPort: {{ $metricsPort }}
      protocol: TCP
    {{- end }}
  {{- end }}
  env:
    # {{ if .sidecar }}Loopback only: the pod's own containers are its callers.{{ else }}Every address: the Service and the NetworkPolicy say who reaches it.{{ end }}
    - name: METERING_GATEWAY_LISTEN
      value: {{ if .sidecar }}"127.0.0.1:{{ $port }}"{{ else }}"0.0.0.0:{{ $port }}"{{ end }}
    {{- if $metricsPort }}
    - name: METERING_GATEWAY_METRICS_LISTEN
      value: "0.0.0.0:{{ $metricsPort }}"
    {{- end }}
    - name: METERING_GATEWAY_REFLECTION
      value: {{ $v.reflection | quote }}
    - name: METERING_GATEWAY_GRACE
      value: "{{ int $v.grace }}s"
    - name: METERING_GATEWAY_PROCESSES
      value: {{ $v.processes | quote }}
    {{- with $v.region }}
    - name: AWS_REGION
      value: {{ . | quote }}
    {{- end }}
    {{- with $v.products }}
    - name: METERING_GATEWAY_PRODUCTS
      value: {{ . | quote }}
    {{- end }}
    {{- if eq $v.spool.type "sqlite" }}
    # The SQLite file, on the claim mounted below; a new, empty spool only on the
    # mounted volume, so a pod whose volume did not mount stops instead of starting over.
    - name: METERING_GATEWAY_SPOOL
      value: "{{ include "metering-gateway.sqliteDir" $root }}/spool.db"
    - name: METERING_GATEWAY_SPOOL_CREATE
      value: if-mounted
    {{- else if eq $v.spool.type "postgres" }}
    # The DSN and the password come from the Secret, never from values.
    - name: METERING_GATEWAY_SPOOL
      valueFrom:
        secretKeyRef:
          name: {{ $v.spool.postgres.existingSecret | quote }}
          key: {{ $v.spool.postgres.dsnKey | quote }}
    - name: PGPASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ $v.spool.postgres.existingSecret | quote }}
          key: {{ $v.spool.postgres.passwordKey | quote }}
    {{- if $v.spool.postgres.caConfigMap }}
    - name: PGSSLROOTCERT
      value: "/etc/metering-gateway/pg-ca/{{ $v.spool.postgres.caKey }}"
    {{- end }}
    {{- end }}
    {{- if and $v.zeroUsageHours (ne $v.spool.type "none") }}
    - name: METERING_GATEWAY_ZERO_USAGE_HOURS
      value: {{ $v.zeroUsageHours | quote }}
    {{- end }}
    {{- if $v.registerUsage.productCode }}
    - name: METERING_GATEWAY_REGISTER_USAGE
      value: {{ $v.registerUsage.productCode | quote }}
    - name: METERING_GATEWAY_REGISTER_USAGE_KEY_VERSION
      value: {{ int $v.registerUsage.keyVersion | quote }}
    {{- if include "metering-gateway.hasPublicKey" $root }}
    - name: METERING_GATEWAY_REGISTER_USAGE_PUBLIC_KEY
      value: "/etc/metering-gateway/register-usage/{{ $v.registerUsage.publicKeyKey }}"
    {{- end }}
    {{- end }}
    {{- if $v.tls.secretName }}
    - name: METERING_GATEWAY_TLS_CERT
      value: /etc/metering-gateway/tls/tls.crt
    - name: METERING_GATEWAY_TLS_KEY
      value: /etc/metering-gateway/tls/tls.key
    {{- if $v.tls.clientCA }}
    - name: METERING_GATEWAY_TLS_CLIENT_CA
      value: /etc/metering-gateway/tls/ca.crt
    {{- end }}
    # The probes' `metering-gateway health` speaks TLS too (and presents the server's
    # own certificate where mTLS asks for one).
    - name: METERING_GATEWAY_HEALTH_TLS_CA
      value: /etc/metering-gateway/tls/ca.crt
    {{- if $v.tls.clientCA }}
    - name: METERING_GATEWAY_HEALTH_TLS_CERT
      value: /etc/metering-gateway/tls/tls.crt
    - name: METERING_GATEWAY_HEALTH_TLS_KEY
      value: /etc/metering-gateway/tls/tls.key
    {{- end }}
    {{- with $v.tls.healthTarget }}
    - name: METERING_GATEWAY_HEALTH_TARGET
      value: {{ . | quote }}
    {{- end }}
    {{- if include "metering-gateway.hasAuthz" $root }}
    - name: METERING_GATEWAY_AUTHZ_POLICY
      value: "/etc/metering-gateway/authz/{{ $v.authz.policyKey }}"
    {{- end }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # The process is up: it answers the health service at all.
  startupProbe:
    {{- include "metering-gateway.probe" (dict "root" $root "sidecar" .sidecar "service" "" "timing" $v.probes.startup) | trim | nindent 4 }}
  # The process is stuck: restart it. The server's status only, never the spool's: a
  # restart fixes neither a full disk nor an unreachable database.
  livenessProbe:
    {{- include "metering-gateway.probe" (dict "root" $root "sidecar" .sidecar "service" "" "timing" $v.probes.liveness) | trim | nindent 4 }}
  # Ready while the pod can serve MeterUsage. Not the recorder's status: it turns
  # NOT_SERVING on every replica at once when a shared database is down (docs/deploy.md,
  # "Probes and readiness").
  readinessProbe:
    {{- include "metering-gateway.probe" (dict "root" $root "sidecar" .sidecar "service" "marketplace.metering.v1.MeteringService" "timing" $v.probes.readiness) | trim | nindent 4 }}
  lifecycle:
    preStop:
      # Endpoints and callers' resolvers drop the pod before SIGTERM makes it refuse calls.
      exec:
        command: ["sleep", {{ int $v.preStopSeconds | quote }}]
  resources:
    {{- toYaml $resources | nindent 4 }}
  securityContext:
    {{- if .sidecar }}
    # In someone else's pod: the container says it all itself (uid 10001 is the image's USER).
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    seccompProfile:
      type: RuntimeDefault
    {{- end }}
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
  volumeMounts:
    - name: {{ $prefix }}tmp
      mountPath: /tmp
    {{- if eq $v.spool.type "sqlite" }}
    - name: spool
      mountPath: {{ include "metering-gateway.sqliteDir" $root }}
    {{- end }}
    {{- if and (eq $v.spool.type "postgres") $v.spool.postgres.caConfigMap }}
    - name: {{ $prefix }}pg-ca
      mountPath: /etc/metering-gateway/pg-ca
      readOnly: true
    {{- end }}
    {{- if $v.tls.secretName }}
    - name: {{ $prefix }}tls
      mountPath: /etc/metering-gateway/tls
      readOnly: true
    {{- if include "metering-gateway.hasAuthz" $root }}
    - name: {{ $prefix }}authz
      mountPath: /etc/metering-gateway/authz
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if and $v.registerUsage.productCode (include "metering-gateway.hasPublicKey" $root) }}
    - name: {{ $prefix }}register-usage
      mountPath: /etc/metering-gateway/register-usage
      readOnly: true
    {{- end }}
{{- end }}

{{- define "metering-gateway.volumes" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $prefix := include "metering-gateway.volumePrefix" . }}
- name: {{ $prefix }}tmp
  emptyDir: {}
{{- if and (eq $v.spool.type "postgres") $v.spool.postgres.caConfigMap }}
- name: {{ $prefix }}pg-ca
  configMap:
    name: {{ $v.spool.postgres.caConfigMap | quote }}
{{- end }}
{{- if $v.tls.secretName }}
- name: {{ $prefix }}tls
  secret:
    secretName: {{ $v.tls.secretName | quote }}
{{- if include "metering-gateway.hasAuthz" $root }}
- name: {{ $prefix }}authz
  configMap:
    name: {{ include "metering-gateway.authzConfigMap" $root | quote }}
{{- end }}
{{- end }}
{{- if and $v.registerUsage.productCode (include "metering-gateway.hasPublicKey" $root) }}
- name: {{ $prefix }}register-usage
  configMap:
    name: {{ include "metering-gateway.registerUsageConfigMap" $root | quote }}
{{- end }}
{{- end }}

{{/* The pod-level part shared by the Deployment and the StatefulSet. */}}
{{- define "metering-gateway.podSpec" -}}
{{- $v := .Values }}
serviceAccountName: {{ include "metering-gateway.serviceAccountName" . }}
# IRSA's token is projected by EKS' webhook; the gateway never calls the Kubernetes API.
automountServiceAccountToken: false
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
# The drain grace + the preStop sleep + a margin.
terminationGracePeriodSeconds: {{ include "metering-gateway.terminationGracePeriodSeconds" . }}
securityContext:
  # The image's USER (numeric, so runAsNonRoot can verify it).
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  # Makes a mounted volume writable by the gateway's user.
  fsGroup: 10001
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml $v.topologySpreadConstraints | nindent 2 }}
{{- else if eq $v.mode "shared" }}
# One replica per node, so a node's loss takes at most one; zones are spread when they
# can be. matchLabelKeys counts each rollout's pods on their own, so the surge pod is
# never blocked by the pods it replaces.
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: DoNotSchedule
    nodeTaintsPolicy: Honor
    labelSelector:
      matchLabels:
        {{- include "metering-gateway.selectorLabels" . | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "metering-gateway.selectorLabels" . | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
{{- end }}
containers:
  {{- include "metering-gateway.container" (dict "root" . "sidecar" false) | trim | nindent 2 }}
volumes:
  {{- include "metering-gateway.volumes" (dict "root" . "sidecar" false) | trim | nindent 2 }}
{{- end }}

{{/* The pod template's metadata: labels, scrape annotations, and a checksum of the
ConfigMaps the gateway reads once at start-up, so that changing them rolls the pods. */}}
{{- define "metering-gateway.podMetadata" -}}
{{- $v := .Values }}
labels:
  {{- include "metering-gateway.labels" . | nindent 2 }}
  {{- with $v.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
  {{- if $v.metrics.enabled }}
  # For Prometheus setups that discover pods by annotation (metrics.podMonitor or
  # metrics.serviceMonitor does the same with the Prometheus Operator).
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ $v.metrics.port | quote }}
  prometheus.io/path: /metrics
  {{- end }}
  {{- with $v.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
