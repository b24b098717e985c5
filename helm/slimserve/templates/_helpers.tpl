{{/* Names and labels */}}
{{- define "slimserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slimserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "slimserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "slimserve.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "slimserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slimserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "slimserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "slimserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "slimserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "slimserve.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "slimserve.fullname" .)) .Values.cache.existingClaim -}}
{{- end -}}

{{- define "slimserve.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "slimserve.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "slimserve.adminKeysSecretName" -}}
{{- default (printf "%s-admin-keys" (include "slimserve.fullname" .)) .Values.adminKeys.existingSecret -}}
{{- end -}}

{{/*
The Ray Serve config (serveConfigV2): one application built from the slimserve config. Variant
weights leave the args and become the ingress deployment's user_config: Serve applies a change
of user_config alone to the live ingress (SlimserveIngress.reconfigure), while a change of args
rebuilds the application and restarts every engine.
*/}}
{{/*
A pod's termination grace: the ingress's drain (slimserve.ingress.drain_timeout_s, 300 s by default
as in serve/config/ingress.py) plus 30 s for Serve and Ray to shut down after it.
*/}}
{{- define "slimserve.terminationGraceSeconds" -}}
{{- $drain := (.Values.slimserve.ingress | default dict).drain_timeout_s | default 300 -}}
{{- add (ceil (float64 $drain) | int) 30 -}}
{{- end -}}

{{- define "slimserve.serveConfig" -}}
{{- $cfg := required "slimserve: a slimserve config with `models` is required" .Values.slimserve -}}
{{- $_ := required "slimserve.cache_dir is required: the artifact cache volume is mounted there" $cfg.cache_dir -}}
{{- $args := deepCopy $cfg -}}
{{- $weights := dict -}}
{{- range $m := $args.models -}}
{{- $w := dict -}}
{{- range $v := $m.variants -}}
{{- $_ := set $w $v.name (hasKey $v "weight" | ternary $v.weight 1) -}}
{{- $_ := unset $v "weight" -}}
{{- end -}}
{{- $_ := set $weights $m.name $w -}}
{{- end -}}
{{- $ingress := dict "name" "SlimserveIngress" "user_config" (dict "weights" $weights) -}}
{{- $app := dict "name" "slimserve" "route_prefix" "/" "import_path" "slimserve.serve.app:build_app" "args" $args "deployments" (list $ingress) -}}
{{- dict "applications" (list $app) | toYaml -}}
{{- end -}}

{{/*
Worker pods needed by the variants. Every engine replica is one tensor-parallel group of
tensor_parallel_size ranks (gpu: gpu_share of a GPU per rank, 1 when unset; cpu: num_cpus_per_worker
CPUs per rank) that must fit inside one pod. Groups of one size are packed floor(capacity / size) to a pod; sizes
are not mixed, which over-counts a little at worst and never strands a group.
*/}}
{{- define "slimserve.workerCount" -}}
{{- $gpu := eq .Values.accelerator "gpu" -}}
{{- $capacity := ternary (float64 .Values.workers.gpus) (float64 .Values.workers.cpus) $gpu -}}
{{- $unit := ternary "GPUs" "CPUs" $gpu -}}
{{- $capacityKey := ternary "workers.gpus" "workers.cpus" $gpu -}}
{{- $groups := dict -}}
{{- range $m := .Values.slimserve.models -}}
{{- $modelTp := dig "engine" "tensor_parallel_size" 1 $m -}}
{{- $modelShare := dig "engine" "gpu_share" 1 $m | default 1 -}}
{{- $replicas := dig "deployment" "replicas" 1 $m -}}
{{- $cpusPerRank := dig "deployment" "num_cpus_per_worker" 1 $m -}}
{{- range $v := $m.variants -}}
{{- $tp := dig "engine" "tensor_parallel_size" $modelTp $v -}}
{{- $share := dig "engine" "gpu_share" $modelShare $v | default 1 -}}
{{- $size := ternary (mulf $tp $share) (mulf $tp $cpusPerRank) $gpu -}}
{{- if gt $size $capacity -}}
{{- fail (printf "model %s, variant %s: tensor_parallel_size %v needs %v %s inside one worker pod, but %s is %v. Raise %s or lower tensor_parallel_size (a tensor-parallel group never spans pods)." $m.name $v.name $tp $size $unit $capacityKey $capacity $capacityKey) -}}
{{- end -}}
{{- $key := toString $size -}}
{{- $_ := set $groups $key (add (get $groups $key | default 0) $replicas) -}}
{{- end -}}
{{- end -}}
{{- $workers := 0 -}}
{{- range $key, $count := $groups -}}
{{- $perPod := floor (divf $capacity (float64 $key)) -}}
{{- $workers = add $workers (ceil (divf $count $perPod)) -}}
{{- end -}}
{{- $workers -}}
{{- end -}}

{{/* Environment of every Ray pod. */}}
{{- define "slimserve.env" -}}
- name: SLIMSERVE_ACCELERATOR
  value: {{ .Values.accelerator | quote }}
- name: SLIMSERVE_HOME
  value: {{ .Values.home | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: {{ ternary "1" "0" .Values.rayServeThroughputOptimized | quote }}
{{- if .Values.optimizerPython }}
- name: SLIMSERVE_OPTIMIZER_PYTHON
  value: {{ .Values.optimizerPython | quote }}
{{- end }}
{{- if or .Values.apiKeys.keys .Values.apiKeys.existingSecret }}
- name: SLIMSERVE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "slimserve.apiKeysSecretName" . }}
      key: {{ .Values.apiKeys.secretKey }}
{{- end }}
{{- if or .Values.adminKeys.keys .Values.adminKeys.existingSecret }}
- name: SLIMSERVE_ADMIN_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "slimserve.adminKeysSecretName" . }}
      key: {{ .Values.adminKeys.secretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod: artifact cache, SLIMSERVE_HOME, /dev/shm, extra. */}}
{{- define "slimserve.volumes" -}}
- name: artifact-cache
{{- if .Values.cache.volume }}
  {{- toYaml .Values.cache.volume | nindent 2 }}
{{- else if or .Values.cache.create .Values.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ include "slimserve.cacheClaimName" . }}
{{- else }}
  {{- fail "cache: set cache.create, cache.existingClaim or cache.volume (the artifact cache shared by replicas)" }}
{{- end }}
- name: slimserve-home
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "slimserve.volumeMounts" -}}
- name: slimserve-home
  mountPath: {{ .Values.home }}
- name: artifact-cache
  mountPath: {{ .Values.slimserve.cache_dir }}
- name: dshm
  mountPath: /dev/shm
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Requests = limits of a worker pod; GPUs only for accelerator gpu. */}}
{{- define "slimserve.workerResources" -}}
cpu: {{ .Values.workers.cpus | quote }}
memory: {{ .Values.workers.memory }}
{{- if eq .Values.accelerator "gpu" }}
nvidia.com/gpu: {{ .Values.workers.gpus | quote }}
{{- end }}
{{- end -}}

{{/* Same renaming as deploy/prometheus/prometheus.yml: Ray's ray_slimserve_* -> slimserve_*. */}}
{{- define "slimserve.metricRelabelings" -}}
- sourceLabels: [__name__]
  regex: ray_(slimserve_.*)
  targetLabel: __name__
  replacement: $1
  action: replace
{{- end -}}
