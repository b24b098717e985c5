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
Every engine replica group of the variants, as JSON {"engines": [{model, variant, tp, size, replicas, shareSet}]}
(replicas: with autoscaling, the variant's max_replicas, its own or the model's).
An engine replica is one tensor-parallel group of tensor_parallel_size ranks (gpu: gpu_share of a
GPU per rank, 1 when unset; cpu: num_cpus_per_worker CPUs per rank); `size` is the GPUs or CPUs
of one group, which must fit inside one pod.
*/}}
{{- define "slimserve.engines" -}}
{{- $gpu := eq .Values.accelerator "gpu" -}}
{{- $engines := list -}}
{{- range $m := .Values.slimserve.models -}}
{{- $modelTp := dig "engine" "tensor_parallel_size" 1 $m -}}
{{- $modelShare := dig "engine" "gpu_share" 1 $m | default 1 -}}
{{- $modelReplicas := dig "deployment" "autoscaling" "max_replicas" (dig "deployment" "replicas" 1 $m) $m -}}
{{- $cpusPerRank := dig "deployment" "num_cpus_per_worker" 1 $m -}}
{{- range $v := $m.variants -}}
{{- $tp := dig "engine" "tensor_parallel_size" $modelTp $v -}}
{{- $share := dig "engine" "gpu_share" $modelShare $v | default 1 -}}
{{- $size := ternary (mulf $tp $share) (mulf $tp $cpusPerRank) $gpu -}}
{{- $shareSet := not (kindIs "invalid" (dig "engine" "gpu_share" (dig "engine" "gpu_share" nil $m) $v)) -}}
{{- $replicas := dig "autoscaling" "max_replicas" $modelReplicas $v -}}
{{- $engines = append $engines (dict "model" $m.name "variant" $v.name "tp" $tp "size" $size "replicas" $replicas "shareSet" $shareSet) -}}
{{- end -}}
{{- end -}}
{{- dict "engines" $engines | toJson -}}
{{- end -}}

{{/*
Pods of `capacity` GPUs (cpu: CPUs) that hold every engine replica of the variants. Groups of one
size are packed floor(capacity / size) to a pod; sizes are not mixed, which over-counts a little
at worst and never strands a group. Fails naming a variant whose group fits no such pod.
Arguments: dict "root" . "capacity" N "capacityKey" "the values key N comes from".
*/}}
{{- define "slimserve.podsFor" -}}
{{- $gpu := eq .root.Values.accelerator "gpu" -}}
{{- $capacity := float64 .capacity -}}
{{- $unit := ternary "GPUs" "CPUs" $gpu -}}
{{- $groups := dict -}}
{{- range $e := (include "slimserve.engines" .root | fromJson).engines -}}
{{- if gt (float64 $e.size) $capacity -}}
{{- fail (printf "model %s, variant %s: tensor_parallel_size %v needs %v %s inside one worker pod, but %s is %v. Raise %s or lower tensor_parallel_size (a tensor-parallel group never spans pods)." $e.model $e.variant $e.tp $e.size $unit $.capacityKey $capacity $.capacityKey) -}}
{{- end -}}
{{- $key := toString $e.size -}}
{{- $_ := set $groups $key (add (get $groups $key | default 0) $e.replicas) -}}
{{- end -}}
{{- $pods := 0 -}}
{{- range $key, $count := $groups -}}
{{- $perPod := floor (divf $capacity (float64 $key)) -}}
{{- $pods = add $pods (ceil (divf $count $perPod)) -}}
{{- end -}}
{{- $pods -}}
{{- end -}}

{{/* Worker pods of the one `workers` group needed by the variants (see slimserve.podsFor). */}}
{{- define "slimserve.workerCount" -}}
{{- $gpu := eq .Values.accelerator "gpu" -}}
{{- $capacity := ternary .Values.workers.gpus .Values.workers.cpus $gpu -}}
{{- include "slimserve.podsFor" (dict "root" . "capacity" $capacity "capacityKey" (ternary "workers.gpus" "workers.cpus" $gpu)) -}}
{{- end -}}

{{/*
The worker groups of the RayCluster, as JSON {"groups": [{name, replicas, minReplicas,
maxReplicas, gpus, cpus, memory, rayStartParams, nodeSelector, tolerations, affinity}]}.

Without `workerGroups`: one group from `workers`, its pods computed from the variants unless
workers.replicas is set. With `workerGroups`: one group per entry, each taking `workers`' pod
settings for the keys it leaves out (never its counts); every engine must fit the largest pod,
and the groups together (at maxReplicas with autoscaling, else at replicas) must hold the GPUs
(cpu: CPUs) of every engine.

Counts: autoscaling off: replicas = minReplicas = maxReplicas (a group of `workerGroups` must set
replicas). Autoscaling on: minReplicas (default 0) and maxReplicas (required) bound the group and
KubeRay's autoscaler moves it between them; replicas is the count to start with (`workers`: the
computed count, a group: its minReplicas) and must lie between them. On GPU, every one-GPU engine
then needs an explicit engine.gpu_share: the automatic plan is made against the GPUs up when the
application deploys, which a growing cluster does not have yet.
*/}}
{{- define "slimserve.workerGroups" -}}
{{- $gpu := eq .Values.accelerator "gpu" -}}
{{- $auto := .Values.autoscaling.enabled -}}
{{- $base := omit .Values.workers "replicas" "minReplicas" "maxReplicas" -}}
{{- $unit := ternary "gpus" "cpus" $gpu -}}
{{- $groups := list -}}
{{- if and $auto $gpu -}}
{{- range $e := (include "slimserve.engines" . | fromJson).engines -}}
{{- if and (eq (int $e.tp) 1) (not $e.shareSet) -}}
{{- fail (printf "autoscaling.enabled: model %s, variant %s has no engine.gpu_share. slimserve plans GPU shares against the GPUs up when the application deploys, and a cluster the autoscaler is still growing has too few: engines would split GPUs or fail to start. Set gpu_share (1: a whole GPU per engine) on the model or the variant." $e.model $e.variant) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.workerGroups -}}
{{- $names := dict -}}
{{- $largest := 0 -}}
{{- $held := 0.0 -}}
{{- range $i, $entry := .Values.workerGroups -}}
{{- $where := printf "workerGroups[%d] (%s)" $i $entry.name -}}
{{- if hasKey $names $entry.name -}}
{{- fail (printf "%s: the group name %s is used twice" $where $entry.name) -}}
{{- end -}}
{{- $_ := set $names $entry.name true -}}
{{- $g := deepCopy $base -}}
{{- range $k, $v := $entry -}}
{{- $_ := set $g $k $v -}}
{{- end -}}
{{- if $auto -}}
{{- if kindIs "invalid" $g.maxReplicas -}}
{{- fail (printf "%s: set maxReplicas, the most pods KubeRay's autoscaler may start in this group (autoscaling.enabled is true)" $where) -}}
{{- end -}}
{{- $_ := set $g "minReplicas" ($g.minReplicas | default 0) -}}
{{- $_ := set $g "replicas" (kindIs "invalid" $g.replicas | ternary $g.minReplicas $g.replicas) -}}
{{- else -}}
{{- if kindIs "invalid" $g.replicas -}}
{{- fail (printf "%s: set replicas, the group's worker pods (or turn on autoscaling.enabled and set maxReplicas)" $where) -}}
{{- end -}}
{{- $_ := set $g "minReplicas" $g.replicas -}}
{{- $_ := set $g "maxReplicas" $g.replicas -}}
{{- end -}}
{{- $capacity := int (get $g $unit) -}}
{{- if gt $capacity $largest -}}
{{- $largest = $capacity -}}
{{- end -}}
{{- $held = addf $held (mulf $capacity $g.maxReplicas) -}}
{{- $groups = append $groups $g -}}
{{- end -}}
{{- $_ := include "slimserve.podsFor" (dict "root" . "capacity" $largest "capacityKey" (printf "the largest workerGroups[].%s" $unit)) -}}
{{- $needed := 0.0 -}}
{{- range $e := (include "slimserve.engines" . | fromJson).engines -}}
{{- $needed = addf $needed (mulf $e.size $e.replicas) -}}
{{- end -}}
{{- if gt $needed $held -}}
{{- fail (printf "workerGroups: the variants' engine replicas need %v %s in all, but the groups hold %v at most (%s x %s). Add pods or groups." $needed (ternary "GPUs" "CPUs" $gpu) $held (ternary "maxReplicas" "replicas" $auto) $unit) -}}
{{- end -}}
{{- else -}}
{{- $g := deepCopy $base -}}
{{- $_ := set $g "name" (ternary "gpu-workers" "cpu-workers" $gpu) -}}
{{- $count := .Values.workers.replicas | default (include "slimserve.workerCount" . | int) | int -}}
{{- if $auto -}}
{{- $max := .Values.workers.maxReplicas -}}
{{- if kindIs "invalid" $max -}}
{{- fail "workers.maxReplicas: set the most worker pods KubeRay's autoscaler may start (autoscaling.enabled is true)" -}}
{{- end -}}
{{- if gt $count (int $max) -}}
{{- fail (printf "workers.maxReplicas is %v, but the variants' engine replicas need %d worker pods (or workers.replicas is %d). Raise workers.maxReplicas." $max $count $count) -}}
{{- end -}}
{{- $_ := set $g "minReplicas" (.Values.workers.minReplicas | default 0) -}}
{{- $_ := set $g "maxReplicas" $max -}}
{{- else -}}
{{- $_ := set $g "minReplicas" $count -}}
{{- $_ := set $g "maxReplicas" $count -}}
{{- end -}}
{{- $_ := set $g "replicas" $count -}}
{{- $groups = append $groups $g -}}
{{- end -}}
{{- range $g := $groups -}}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- fail (printf "worker group %s: minReplicas %v <= replicas %v <= maxReplicas %v does not hold" $g.name $g.minReplicas $g.replicas $g.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- dict "groups" $groups | toJson -}}
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

{{/* Requests = limits of a worker pod of group `group`; GPUs only for accelerator gpu. */}}
{{- define "slimserve.workerResources" -}}
cpu: {{ .group.cpus | int | quote }}
memory: {{ .group.memory }}
{{- if .gpu }}
nvidia.com/gpu: {{ .group.gpus | int | quote }}
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
