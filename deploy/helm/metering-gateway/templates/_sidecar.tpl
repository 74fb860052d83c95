{{/*
The sidecar: the gateway in an ISV's own pod, RegisterUsage on, listening on
127.0.0.1:50051 only (the pod's containers dial it; nothing outside the pod can).

An ISV chart that depends on this chart (dependencies: name metering-gateway, with
values mode: sidecar, registerUsage.*, image.repository ...) puts it in its pod:

  spec:
    serviceAccountName: <a ServiceAccount with the IRSA role, e.g. this chart's>
    terminationGracePeriodSeconds: {{ include "metering-gateway.terminationGracePeriodSeconds" (index .Subcharts "metering-gateway") }}
    containers:
      - name: app
        ...
      {{- include "metering-gateway.sidecar" (index .Subcharts "metering-gateway") | trim | nindent 6 }}
    volumes:
      {{- include "metering-gateway.sidecarVolumes" (index .Subcharts "metering-gateway") | trim | nindent 6 }}

Both take this chart's scope (.Subcharts, Helm 3.7 or later; the chart's kubeVersion,
Kubernetes 1.29 or later, applies to your release too), so its values, names and
appVersion are its own. Both fail unless mode is sidecar: in another mode this chart
would also run gateway pods of its own in your release. docs/deploy.md has the full snippet; ci/sidecar-values.yaml
renders templates/sidecar-example.yaml with it.
*/}}

{{- define "metering-gateway.sidecarOnly" -}}
{{- if ne .Values.mode "sidecar" }}
{{- fail "include \"metering-gateway.sidecar\" (and sidecarVolumes) needs mode: sidecar in this chart's values (metering-gateway.mode in your chart's): in another mode the chart also runs gateway pods of its own" }}
{{- end }}
{{- end }}

{{- define "metering-gateway.sidecar" -}}
{{- include "metering-gateway.sidecarOnly" . }}
{{- include "metering-gateway.validate" . }}
{{- include "metering-gateway.container" (dict "root" . "sidecar" true) }}
{{- end }}

{{- define "metering-gateway.sidecarVolumes" -}}
{{- include "metering-gateway.sidecarOnly" . }}
{{- include "metering-gateway.volumes" (dict "root" . "sidecar" true) }}
{{- end }}
