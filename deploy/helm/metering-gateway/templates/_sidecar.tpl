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

Both take this chart's scope (.Subcharts, Helm 3.14+), so its values, names and
appVersion are its own. docs/deploy.md has the full snippet; ci/sidecar-values.yaml
renders templates/sidecar-example.yaml with it.
*/}}

{{- define "metering-gateway.sidecar" -}}
{{- include "metering-gateway.validate" . }}
{{- include "metering-gateway.container" (dict "root" . "sidecar" true) }}
{{- end }}

{{- define "metering-gateway.sidecarVolumes" -}}
{{- include "metering-gateway.volumes" (dict "root" . "sidecar" true) }}
{{- end }}
