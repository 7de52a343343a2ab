{{/*
Named templates shared by every workload. Each object kind is rendered from these, so a new component
only needs a new entry under `components:` in values.yaml.
*/}}

{{- define "eta-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eta-platform.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eta-platform.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of a per-component object: <fullname>-<component>. Call with (dict "root" $ "component" "x"). */}}
{{- define "eta-platform.componentName" -}}
{{- printf "%s-%s" (include "eta-platform.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eta-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eta-platform.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels. Call with (dict "root" $ "component" "x"). */}}
{{- define "eta-platform.labels" -}}
helm.sh/chart: {{ include "eta-platform.chart" .root }}
{{ include "eta-platform.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: eta-platform
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "eta-platform.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "eta-platform.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eta-platform.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eta-platform.configMapName" -}}
{{- printf "%s-config" (include "eta-platform.fullname" .) -}}
{{- end -}}

{{/* Secret holding DATABASE_URL and the key inside it. */}}
{{- define "eta-platform.databaseSecretName" -}}
{{- if and .Values.database.existingSecret (not .Values.devInfra.enabled) -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "eta-platform.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "eta-platform.databaseSecretKey" -}}
{{- if and .Values.database.existingSecret (not .Values.devInfra.enabled) -}}
{{- .Values.database.existingSecretKey -}}
{{- else -}}
DATABASE_URL
{{- end -}}
{{- end -}}

{{/* True (non-empty) when the chart renders the database Secret itself. */}}
{{- define "eta-platform.createDatabaseSecret" -}}
{{- if or .Values.devInfra.enabled (not .Values.database.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* Migrations need PostgreSQL: before the release's objects with external databases, after them when
the database is part of the release (devInfra). */}}
{{- define "eta-platform.migrationHook" -}}
{{- if .Values.devInfra.enabled -}}post-install,post-upgrade{{- else -}}pre-install,pre-upgrade{{- end -}}
{{- end -}}

{{/* ---------------- Endpoints (in-cluster dev infrastructure wins when enabled) ---------------- */}}
{{- define "eta-platform.devHost" -}}
{{- printf "%s-%s" (include "eta-platform.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eta-platform.kafkaBootstrap" -}}
{{- if .Values.devInfra.enabled -}}
{{- printf "%s:9092" (include "eta-platform.devHost" (dict "root" . "name" "kafka")) -}}
{{- else -}}
{{- required "kafka.bootstrapServers is required when devInfra.enabled is false" .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{- define "eta-platform.redisUrl" -}}
{{- if .Values.devInfra.enabled -}}
{{- printf "redis://%s:6379/0" (include "eta-platform.devHost" (dict "root" . "name" "redis")) -}}
{{- else -}}
{{- required "redis.url is required when devInfra.enabled is false" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- define "eta-platform.databaseUrl" -}}
{{- if .Values.devInfra.enabled -}}
{{- $pg := .Values.devInfra.postgres -}}
{{- printf "postgresql://%s:%s@%s:5432/%s" $pg.user $pg.password (include "eta-platform.devHost" (dict "root" . "name" "postgres")) $pg.database -}}
{{- else -}}
{{- required "database.url (or database.existingSecret) is required when devInfra.enabled is false" .Values.database.url -}}
{{- end -}}
{{- end -}}

{{- define "eta-platform.otlpEndpoint" -}}
{{- if .Values.devInfra.enabled -}}
{{- printf "http://%s:4317" (include "eta-platform.devHost" (dict "root" . "name" "jaeger")) -}}
{{- else -}}
{{- .Values.telemetry.otlpEndpoint -}}
{{- end -}}
{{- end -}}

{{/* ---------------- Pod building blocks ---------------- */}}

{{/* Environment of one of our containers. Call with (dict "root" $ "serviceName" "eta-x" "database" bool "env" map). */}}
{{- define "eta-platform.env" -}}
{{- $root := .root -}}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=eta-platform,service.version=%s,k8s.namespace.name=$(K8S_NAMESPACE),k8s.pod.name=$(K8S_POD_NAME)%s" $root.Chart.AppVersion (ternary (printf ",%s" $root.Values.telemetry.resourceAttributes) "" (ne $root.Values.telemetry.resourceAttributes "")) | quote }}
{{- if .database }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "eta-platform.databaseSecretName" $root }}
      key: {{ include "eta-platform.databaseSecretKey" $root }}
{{- end }}
{{- if and $root.Values.redis.existingSecret (not $root.Values.devInfra.enabled) }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.redis.existingSecret }}
      key: {{ $root.Values.redis.existingSecretKey }}
{{- end }}
{{- range $k, $v := .env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* Non-secret configuration shared by every workload of ours (ConfigMap data). */}}
{{- define "eta-platform.configData" -}}
KAFKA_BOOTSTRAP_SERVERS: {{ include "eta-platform.kafkaBootstrap" . | quote }}
KAFKA_TOPIC_PREFIX: {{ .Values.kafka.topicPrefix | quote }}
KAFKA_TOPIC_PARTITIONS: {{ .Values.kafka.partitions | toString | quote }}
{{- if or .Values.devInfra.enabled (not .Values.redis.existingSecret) }}
REDIS_URL: {{ include "eta-platform.redisUrl" . | quote }}
{{- end }}
LOG_LEVEL: {{ .Values.logLevel | quote }}
LOG_FORMAT: {{ .Values.logFormat | quote }}
SHUTDOWN_GRACE_SECONDS: {{ .Values.shutdownGraceSeconds | toString | quote }}
{{- with (include "eta-platform.otlpEndpoint" .) }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
{{- end }}
OTEL_TRACES_SAMPLER: {{ .Values.telemetry.sampler | quote }}
OTEL_TRACES_SAMPLER_ARG: {{ .Values.telemetry.samplerArg | toString | quote }}
{{- range $k, $v := .Values.extraEnv }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* Auth / TLS environment of a gRPC component (ingestion). Call with (dict "auth" map "tls" map). The files
are the Secret volumes mounted in templates/components.yaml. */}}
{{- define "eta-platform.grpcSecurityEnv" -}}
{{- if .auth.enabled }}
- name: INGESTION_AUTH_REQUIRED
  value: {{ .auth.required | toString | quote }}
- name: INGESTION_AUTH_TOKENS_FILE
  value: {{ printf "/etc/eta/auth/%s" .auth.secretKey | quote }}
{{- end }}
{{- if .tls.enabled }}
- name: GRPC_TLS_CERT_FILE
  value: "/etc/eta/tls/tls.crt"
- name: GRPC_TLS_KEY_FILE
  value: "/etc/eta/tls/tls.key"
- name: GRPC_HEALTH_PORT
  value: {{ .tls.healthPort | toString | quote }}
{{- end }}
{{- end -}}

{{- define "eta-platform.envFrom" -}}
- configMapRef:
    name: {{ include "eta-platform.configMapName" . }}
{{- end -}}

{{- define "eta-platform.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "eta-platform.containerSecurityContext" -}}
{{- toYaml .Values.securityContext -}}
{{- end -}}

{{- define "eta-platform.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolumeSizeLimit }}
{{- end -}}

{{- define "eta-platform.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "eta-platform.scheduling" -}}
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
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Init container (devInfra only) that waits until the in-cluster dependencies accept TCP connections, so
first start-up on kind/minikube does not go through CrashLoopBackOff. Uses our own image (python).
Call with (dict "root" $ "deps" (list "kafka" "redis" "postgres")).
*/}}
{{- define "eta-platform.waitForDependencies" -}}
{{- $root := .root -}}
{{- if and $root.Values.devInfra.enabled $root.Values.devInfra.waitForDependencies .deps }}
{{- $ports := dict "kafka" "9092" "redis" "6379" "postgres" "5432" -}}
{{- $targets := list -}}
{{- range .deps -}}
{{- $targets = append $targets (printf "%s:%s" (include "eta-platform.devHost" (dict "root" $root "name" .)) (get $ports .)) -}}
{{- end -}}
- name: wait-for-dependencies
  image: {{ include "eta-platform.image" $root | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import socket, sys, time
      for target in sys.argv[1:]:
          host, port = target.rsplit(":", 1)
          while True:
              try:
                  socket.create_connection((host, int(port)), timeout=2).close()
                  print(f"{target} is up", flush=True)
                  break
              except OSError as exc:
                  print(f"waiting for {target}: {exc}", flush=True)
                  time.sleep(2)
  args:
    {{- toYaml $targets | nindent 4 }}
  securityContext:
    {{- include "eta-platform.containerSecurityContext" $root | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {memory: 64Mi}
{{- end }}
{{- end -}}

{{/*
A run-to-completion pod spec for one of our entrypoints (migrate, seed, train).
Call with (dict "root" $ "name" "migrate" "command" (list ...) "args" (list ...) "serviceName" "eta-x"
"resources" map "deps" (list ...) "env" map-of-extra-plain-env).
*/}}
{{- define "eta-platform.batchPodSpec" -}}
{{- $root := .root -}}
restartPolicy: Never
enableServiceLinks: false
automountServiceAccountToken: false
securityContext:
  {{- include "eta-platform.podSecurityContext" $root | nindent 2 }}
{{- with (include "eta-platform.waitForDependencies" (dict "root" $root "deps" .deps)) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .name }}
    image: {{ include "eta-platform.image" $root | quote }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command:
      {{- toYaml .command | nindent 6 }}
    {{- with .args }}
    args:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- /* Inline rather than envFrom: pre-install hooks run before the ConfigMap exists. */}}
    env:
      {{- include "eta-platform.env" (dict "root" $root "serviceName" .serviceName "database" true "env" (merge (dict) (.env | default dict) (include "eta-platform.configData" $root | fromYaml))) | nindent 6 }}
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- include "eta-platform.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      {{- include "eta-platform.tmpVolumeMount" $root | nindent 6 }}
volumes:
  {{- include "eta-platform.tmpVolume" $root | nindent 2 }}
{{- include "eta-platform.scheduling" $root }}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express. Included from configmap.yaml. */}}
{{- define "eta-platform.validate" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGraceSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be larger than shutdownGraceSeconds (%v)" .Values.terminationGracePeriodSeconds .Values.shutdownGraceSeconds) -}}
{{- end -}}
{{- range $name, $c := .Values.components -}}
{{- if and $c.enabled $c.autoscaling.enabled (lt (int $c.autoscaling.maxReplicas) (int $c.autoscaling.minReplicas)) -}}
{{- fail (printf "components.%s.autoscaling.maxReplicas must be >= minReplicas" $name) -}}
{{- end -}}
{{- end -}}
{{- range $name, $c := .Values.components -}}
{{- $auth := $c.auth | default dict -}}
{{- $tls := $c.tls | default dict -}}
{{- if and $c.enabled (or $auth.enabled $tls.enabled) (ne $name "ingestion") -}}
{{- fail (printf "components.%s: auth and tls are only supported by the ingestion component" $name) -}}
{{- end -}}
{{- if and $c.enabled $auth.enabled (not $auth.existingSecret) -}}
{{- fail (printf "components.%s.auth.existingSecret is required when auth is enabled (tokens never go into values)" $name) -}}
{{- end -}}
{{- if and $c.enabled $tls.enabled (not $tls.existingSecret) -}}
{{- fail (printf "components.%s.tls.existingSecret (a kubernetes.io/tls Secret) is required when tls is enabled" $name) -}}
{{- end -}}
{{- if and $c.enabled $tls.enabled (has (int $tls.healthPort) (list (int $c.grpcPort) (int $c.metricsPort))) -}}
{{- fail (printf "components.%s.tls.healthPort must differ from grpcPort and metricsPort" $name) -}}
{{- end -}}
{{- end -}}
{{- with .Values.components.aggregator -}}
{{- if and .enabled (gt (int .replicas) (int $.Values.kafka.partitions)) -}}
{{- fail (printf "components.aggregator.replicas (%v) > kafka.partitions (%v): extra consumers would sit idle" .replicas $.Values.kafka.partitions) -}}
{{- end -}}
{{- end -}}
{{- end -}}
