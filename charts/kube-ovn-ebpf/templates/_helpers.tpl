{{/*
The name of every object. Not derived from the release name: one agent runs per node and pins
under a fixed bpffs path, so a second release could only fight the first.
*/}}
{{- define "kube-ovn-ebpf.fullname" -}}
{{- default "kube-ovn-ebpf" .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: the same as the Kustomize base's, so a DaemonSet installed with either can be
taken over by the other (a DaemonSet's selector cannot change).
*/}}
{{- define "kube-ovn-ebpf.selectorLabels" -}}
app.kubernetes.io/name: kube-ovn-ebpf
{{- end -}}

{{- define "kube-ovn-ebpf.labels" -}}
{{ include "kube-ovn-ebpf.selectorLabels" . }}
app.kubernetes.io/component: agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kube-ovn-ebpf.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* Capabilities by kernel profile (values.yaml, kernelProfile). */}}
{{- define "kube-ovn-ebpf.capabilities" -}}
{{- if eq .Values.kernelProfile "cap-sys-admin" -}}
["SYS_ADMIN", "NET_ADMIN", "NET_RAW", "SYS_RESOURCE"]
{{- else if eq .Values.kernelProfile "kernel-5.10" -}}
["BPF", "NET_ADMIN", "PERFMON", "NET_RAW", "SYS_RESOURCE"]
{{- else -}}
["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"]
{{- end -}}
{{- end -}}

{{- define "kube-ovn-ebpf.serviceClusterIPRange" -}}
{{- if kindIs "slice" .Values.serviceClusterIPRange -}}
{{ join "," .Values.serviceClusterIPRange }}
{{- else -}}
{{ .Values.serviceClusterIPRange }}
{{- end -}}
{{- end -}}

{{/* The uninstall hook's objects (templates/uninstall-hook.yaml). */}}
{{- define "kube-ovn-ebpf.uninstallLabels" -}}
app.kubernetes.io/name: {{ include "kube-ovn-ebpf.fullname" . }}-uninstall
app.kubernetes.io/component: uninstall
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Hook annotations; the argument is the weight (lower runs first). */}}
{{- define "kube-ovn-ebpf.uninstallHook" -}}
helm.sh/hook: post-delete
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end -}}
