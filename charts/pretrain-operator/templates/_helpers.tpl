{{- define "pretrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pretrain.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pretrain.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pretrain.labels" -}}
app.kubernetes.io/name: {{ include "pretrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pretrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pretrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pretrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pretrain.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions on the objects it manages (kept equal to the code by a test). */}}
{{- define "pretrain.jobRules" -}}
- apiGroups: ["pretrain.io"]
  resources: ["pretrainjobs"]
  # patch: spec.runPolicy.suspend, set when schedulingTimeoutAction is Suspend
  # delete: the job itself, ttlSecondsAfterFinished after it ended
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["pretrain.io"]
  resources: ["pretrainjobs/status"]
  verbs: ["patch"]
# blockOwnerDeletion on the children's owner references, where OwnerReferencesPermissionEnforcement
# is on (OpenShift, hardened clusters)
- apiGroups: ["pretrain.io"]
  resources: ["pretrainjobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["create", "delete", "list", "watch"]
# list and watch: the operator's caches of its children (pretrain.operator.informer)
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "get", "list", "watch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "update", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["create", "get"]
# the data preparation stage (data.prepare): an Indexed Job per PretrainJob, deleted once done
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "delete", "get", "list", "watch"]
# resources.schedulerName volcano: a Volcano PodGroup per attempt
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["create", "delete"]
{{- end -}}
