{{/* Chart name. */}}
{{- define "weckd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource names: <release>-coordinator or <release>-site-<name> (lower case, '_' as '-'). */}}
{{- define "weckd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if eq .Values.role "coordinator" -}}
{{- printf "%s-coordinator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-site-%s" .Release.Name (.Values.site.name | lower | replace "_" "-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "weckd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weckd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.role }}
{{- if eq .Values.role "site" }}
weckd.io/site: {{ .Values.site.name | quote }}
{{- end }}
{{- end -}}

{{- define "weckd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "weckd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "weckd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "weckd.certsSecret" -}}
{{- default (printf "%s-certs" (include "weckd.fullname" .)) .Values.secrets.certs -}}
{{- end -}}

{{- define "weckd.keysSecret" -}}
{{- default (printf "%s-keys" (include "weckd.fullname" .)) .Values.secrets.keys -}}
{{- end -}}

{{/* The config file in the ConfigMap, mounted at /etc/weckd/config. */}}
{{- define "weckd.configFile" -}}
{{- if eq .Values.role "coordinator" -}}
federation.yaml
{{- else -}}
{{- printf "site-%s.yaml" .Values.site.name -}}
{{- end -}}
{{- end -}}

{{- define "weckd.metricsPort" -}}
{{- if eq .Values.role "coordinator" -}}
{{- .Values.coordinator.metricsPort -}}
{{- else -}}
{{- .Values.site.metricsPort -}}
{{- end -}}
{{- end -}}

{{/* The weckd config: the user's config plus what the chart owns (addresses, ports, mounted paths). */}}
{{- define "weckd.config" -}}
{{- if eq .Values.role "coordinator" -}}
{{- $c := .Values.coordinator -}}
{{- $cfg := deepCopy $c.config -}}
{{- $fed := deepCopy (get $cfg "federation" | default dict) -}}
{{- $_ := set $fed "fleet_address" (printf "0.0.0.0:%d" (int $c.fleetPort)) -}}
{{- $_ := set $fed "control_port" (int $c.controlPort) -}}
{{- $_ := set $fed "metrics" true -}}
{{- $_ := set $fed "metrics_address" "0.0.0.0" -}}
{{- $_ := set $fed "metrics_port" (int $c.metricsPort) -}}
{{- $_ := set $fed "state_dir" "/var/lib/weckd/state" -}}
{{- $_ := set $fed "output_dir" "/var/lib/weckd/runs" -}}
{{- $_ := set $fed "ca" "/etc/weckd/certs/ca.crt" -}}
{{- $_ := set $fed "cert" "/etc/weckd/certs/server.pem" -}}
{{- $_ := set $fed "key" "/etc/weckd/certs/server.key" -}}
{{- $sites := dict -}}
{{- range $cfg.chain.order -}}
{{- $_ := set $sites (toString .) (dict "auth_key" (printf "/etc/weckd/keys/site-%s.pub" (toString .))) -}}
{{- end -}}
{{- $_ := set $fed "sites" $sites -}}
{{- if $c.sealing.enabled -}}
{{- $sealing := dict "deliver_to" $c.sealing.deliverTo -}}
{{- if has "coordinator" $c.sealing.deliverTo -}}
{{- $peers := dict -}}
{{- range $cfg.chain.order -}}
{{- $_ := set $peers (toString .) "/etc/weckd/keys" -}}
{{- end -}}
{{- $_ := set $sealing "keys" "/etc/weckd/keys" -}}
{{- $_ := set $sealing "peers" $peers -}}
{{- end -}}
{{- $_ := set $fed "sealing" $sealing -}}
{{- end -}}
{{- $_ := set $cfg "federation" $fed -}}
{{- toYaml $cfg -}}
{{- else -}}
{{- $s := .Values.site -}}
{{- $cfg := deepCopy $s.config -}}
{{- $_ := set $cfg "site" $s.name -}}
{{- $_ := set $cfg "superlink" (printf "%s:%d" $s.coordinator.host (int $s.coordinator.port)) -}}
{{- $_ := set $cfg "ca" "/etc/weckd/certs/ca.crt" -}}
{{- $_ := set $cfg "auth_key" (printf "/etc/weckd/keys/site-%s" $s.name) -}}
{{- $_ := set $cfg "state_dir" "/var/lib/weckd/state" -}}
{{- $_ := set $cfg "metrics" true -}}
{{- $_ := set $cfg "metrics_address" "0.0.0.0" -}}
{{- $_ := set $cfg "metrics_port" (int $s.metricsPort) -}}
{{- $data := deepCopy (get $cfg "data" | default dict) -}}
{{- if not (get $data "dataset") -}}
{{- $paths := deepCopy (get $data "sites" | default dict) -}}
{{- if not (hasKey $paths $s.name) -}}
{{- $_ := set $paths $s.name "/data" -}}
{{- end -}}
{{- $_ := set $data "sites" $paths -}}
{{- end -}}
{{- $_ := set $cfg "data" $data -}}
{{- if $s.sealing.enabled -}}
{{- $peers := dict -}}
{{- range $s.sealing.peers -}}
{{- if ne (toString .) (toString $s.name) -}}
{{- $_ := set $peers (toString .) "/etc/weckd/keys" -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "sealing" (dict "keys" "/etc/weckd/keys" "peers" $peers) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
{{- end -}}

{{/* Checks the schema cannot express; included by every workload template. */}}
{{- define "weckd.validate" -}}
{{- $c := .Values.coordinator -}}
{{- if or (eq (int $c.controlPort) (int $c.fleetPort)) (eq (int $c.controlPort) (int $c.metricsPort)) (eq (int $c.fleetPort) (int $c.metricsPort)) -}}
{{- fail "coordinator: fleetPort, controlPort and metricsPort must differ" -}}
{{- end -}}
{{- end -}}

{{/* The probes: the metrics endpoint answers (weckd serves it from start to exit). */}}
{{- define "weckd.probes" -}}
startupProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 10
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 30
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* The Job's state claim, when the chart makes one (persistence on, no existingClaim). */}}
{{- define "weckd.coordinatorClaim" -}}
{{- printf "%s-state" (include "weckd.fullname" .) -}}
{{- end -}}

{{/* The coordinator's pod template, for both kinds: a StatefulSet's holds once the chain is complete (--hold); a
Job's ends then (restartPolicy OnFailure: a failed run restarts and resumes). */}}
{{- define "weckd.coordinatorPodTemplate" -}}
{{- $c := .Values.coordinator -}}
metadata:
  labels:
    {{- include "weckd.selectorLabels" . | nindent 4 }}
  annotations:
    checksum/config: {{ include "weckd.config" . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- include "weckd.podCommon" . | nindent 2 }}
  {{- if eq $c.kind "Job" }}
  restartPolicy: OnFailure
  {{- end }}
  terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
  containers:
    - name: weckd-server
      {{- include "weckd.containerCommon" . | nindent 6 }}
      args:
        - weckd-server
        - -c
        - /etc/weckd/config/{{ include "weckd.configFile" . }}
        {{- if eq $c.kind "StatefulSet" }}
        - --hold
        {{- end }}
        {{- range .Values.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      ports:
        - name: fleet
          containerPort: {{ $c.fleetPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $c.metricsPort }}
          protocol: TCP
      {{- include "weckd.probes" . | nindent 6 }}
      readinessProbe:  # the Fleet API: closed while holding a completed chain (not ready; /metrics still answers)
        tcpSocket: {port: fleet}
        periodSeconds: 10
      volumeMounts:
        {{- include "weckd.commonMounts" . | nindent 8 }}
  volumes:
    {{- include "weckd.commonVolumes" . | nindent 4 }}
    {{- if $c.persistence.existingClaim }}
    - name: state
      persistentVolumeClaim:
        claimName: {{ $c.persistence.existingClaim }}
    {{- else if not $c.persistence.enabled }}
    - name: state
      emptyDir: {}
    {{- else if eq $c.kind "Job" }}
    - name: state
      persistentVolumeClaim:
        claimName: {{ include "weckd.coordinatorClaim" . }}
    {{- end }}
{{- end -}}

{{/* Volumes and mounts shared by both roles: config, certs, keys (read-only) and /tmp. */}}
{{- define "weckd.commonMounts" -}}
- name: config
  mountPath: /etc/weckd/config
  readOnly: true
- name: certs
  mountPath: /etc/weckd/certs
  readOnly: true
- name: keys
  mountPath: /etc/weckd/keys
  readOnly: true
- name: state
  mountPath: /var/lib/weckd
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "weckd.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "weckd.fullname" . }}-config
- name: certs
  secret:
    secretName: {{ include "weckd.certsSecret" . }}
    defaultMode: 0440
- name: keys
  secret:
    secretName: {{ include "weckd.keysSecret" . }}
    defaultMode: 0440
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Container fields shared by both roles. */}}
{{- define "weckd.containerCommon" -}}
image: {{ include "weckd.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: WECKD_METRICS_PORT
    value: {{ include "weckd.metricsPort" . | quote }}
  {{- with .Values.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod fields shared by both roles. */}}
{{- define "weckd.podCommon" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
