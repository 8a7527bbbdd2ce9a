{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "token-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name: release-chart unless the release name already contains the chart name. */}}
{{- define "token-broker.fullname" -}}
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

{{- define "token-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of the release (a Deployment selector is immutable). */}}
{{- define "token-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "token-broker.labels" -}}
helm.sh/chart: {{ include "token-broker.chart" . }}
{{ include "token-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ (include "token-broker.imageTag" .) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: token-broker
app.kubernetes.io/part-of: token-broker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "token-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "token-broker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "token-broker.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "token-broker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "token-broker.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{/* Where the broker configuration is mounted, and the file it reads (BROKER_CONFIG). */}}
{{- define "token-broker.configDir" -}}/etc/token-broker{{- end -}}
{{- define "token-broker.configFile" -}}
{{- printf "%s/broker.yaml" (include "token-broker.configDir" .) -}}
{{- end -}}

{{/* Name of the ConfigMap the chart renders (unused with config.existingSecret). */}}
{{- define "token-broker.configMapName" -}}
{{- printf "%s-config" (include "token-broker.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The broker YAML: values.config minus the chart's own keys, minus empty strings / nulls, with listen and
metrics taken from containerPorts (listen.tls from tls) and outbound_ca_file from extraCA.
*/}}
{{- define "token-broker.brokerConfig" -}}
{{- $cfg := dict -}}
{{- range $k, $v := omit .Values.config "existingSecret" "existingSecretKey" -}}
{{- if not (or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v ""))) -}}
{{- $_ := set $cfg $k $v -}}
{{- end -}}
{{- end -}}
{{- $listen := dict "host" "0.0.0.0" "port" (int .Values.containerPorts.http) -}}
{{- if .Values.tls.enabled -}}
{{- $dir := trimSuffix "/" .Values.tls.mountPath -}}
{{- $_ := set $listen "tls" (dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir)) -}}
{{- end -}}
{{- $_ := set $cfg "listen" $listen -}}
{{- $_ := set $cfg "metrics" (dict "host" "0.0.0.0" "port" (int .Values.containerPorts.metrics)) -}}
{{- if include "token-broker.extraCA.enabled" . -}}
{{- $_ := set $cfg "outbound_ca_file" (include "token-broker.extraCA.file" .) -}}
{{- end -}}
{{- with .Values.redis.tls }}
{{- if .secret -}}
{{- $dir := trimSuffix "/" $.Values.redis.mountPath -}}
{{- $_ := set $cfg "redis_ca_file" (printf "%s/tls/%s" $dir .caKey) -}}
{{- if .clientCertificate -}}
{{- $_ := set $cfg "redis_client_cert_file" (printf "%s/tls/%s" $dir .certKey) -}}
{{- $_ := set $cfg "redis_client_key_file" (printf "%s/tls/%s" $dir .keyKey) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.redis.passwordSecret -}}
{{- $file := printf "%s/password/%s" (trimSuffix "/" .Values.redis.mountPath) .Values.redis.passwordSecretKey -}}
{{- $_ := set $cfg "redis_password" (dict "file" $file) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Where the extra CA bundle is mounted (outbound_ca_file / BROKER_OUTBOUND_CA_FILE). */}}
{{- define "token-broker.extraCA.file" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.extraCA.mountPath) .Values.extraCA.key -}}
{{- end -}}

{{/* The API port's scheme: kubelet probes it over HTTPS (without verifying) when tls is enabled. */}}
{{- define "token-broker.probeScheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end -}}
{{- end -}}

{{- define "token-broker.extraCA.enabled" -}}
{{- if and .Values.extraCA.configMap .Values.extraCA.secret -}}
{{- fail "extraCA: set either configMap or secret, not both" -}}
{{- end -}}
{{- if or .Values.extraCA.configMap .Values.extraCA.secret -}}true{{- end -}}
{{- end -}}

{{/* Consistency checks that a JSON schema cannot express comfortably. */}}
{{- define "token-broker.validate" -}}
{{- if hasPrefix (printf "%s/" (include "token-broker.configDir" .)) (printf "%s/" (trimSuffix "/" .Values.extraCA.mountPath)) -}}
{{- fail (printf "extraCA.mountPath must not be inside %s (the configuration volume)" (include "token-broker.configDir" .)) -}}
{{- end -}}
{{- if and .Values.tls.enabled (hasPrefix (printf "%s/" (include "token-broker.configDir" .)) (printf "%s/" (trimSuffix "/" .Values.tls.mountPath))) -}}
{{- fail (printf "tls.mountPath must not be inside %s (the configuration volume)" (include "token-broker.configDir" .)) -}}
{{- end -}}
{{- if not .Values.config.existingSecret -}}
{{- $cfg := .Values.config -}}
{{- if and .Values.redis.existingSecret (not $cfg.cache_encryption_key) -}}
{{- fail "config.cache_encryption_key is required when Redis is used (redis.existingSecret is set)" -}}
{{- end -}}
{{- $sources := list -}}
{{- with $cfg.cache_encryption_key }}{{ $sources = append $sources . }}{{ end -}}
{{- range $name, $app := $cfg.apps }}{{ $sources = append $sources $app.credential }}{{ end -}}
{{- range $sources -}}
{{- if and (or (hasKey . "secret") (hasKey . "certificate") (hasKey . "key_vault_key")) (not $cfg.key_vault_url) -}}
{{- fail "config.key_vault_url is required: a credential source refers to Key Vault ({secret: ...} / {certificate: ...} / {key_vault_key: ...})" -}}
{{- end -}}
{{- end -}}
{{- with $cfg.cache_encryption_key -}}
{{- if or (hasKey . "federated") (hasKey . "key_vault_key") -}}
{{- fail "config.cache_encryption_key: only an app credential can be federated or Key Vault-signed" -}}
{{- end -}}
{{- end -}}
{{- $projected := printf "%s/" (trimSuffix "/" $.Values.federatedToken.mountPath) -}}
{{- range $name, $app := $cfg.apps -}}
{{- $federated := and (kindIs "map" $app.credential) $app.credential.federated -}}
{{- if and (kindIs "map" $federated) (hasPrefix $projected (toString $federated.token_file)) (not $.Values.federatedToken.enabled) -}}
{{- fail (printf "config.apps.%s.credential reads a token from %s: set federatedToken.enabled" $name $.Values.federatedToken.mountPath) -}}
{{- end -}}
{{- end -}}
{{- if or (not $cfg.apps) (not $cfg.callers) -}}
{{- fail "config.apps and config.callers need at least one entry each (or use config.existingSecret)" -}}
{{- end -}}
{{- $hashes := dict -}}
{{- range $cname, $caller := $cfg.callers -}}
{{- range $caller.apps -}}
{{- if and (ne . "*") (not (hasKey $cfg.apps .)) -}}
{{- fail (printf "config.callers.%s.apps names %q, which is not in config.apps" $cname .) -}}
{{- end -}}
{{- end -}}
{{- if $caller.api_key_sha256 -}}
{{- $h := lower $caller.api_key_sha256 -}}
{{- if hasKey $hashes $h -}}
{{- fail (printf "config.callers: %s and %s share one api_key_sha256" (get $hashes $h) $cname) -}}
{{- end -}}
{{- $_ := set $hashes $h $cname -}}
{{- end -}}
{{- if and $caller.service_account (not $cfg.service_account_auth) -}}
{{- fail (printf "config.callers.%s.service_account needs config.service_account_auth (issuer, audience)" $cname) -}}
{{- end -}}
{{- end -}}
{{- $drain := 10 -}}
{{- if not (kindIs "invalid" $cfg.drain_seconds) }}{{ $drain = $cfg.drain_seconds }}{{ end -}}
{{- if lt (float64 .Values.terminationGracePeriodSeconds) (addf .Values.preStopSleepSeconds $drain) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must cover preStopSleepSeconds (%v) + config.drain_seconds (%v)" .Values.terminationGracePeriodSeconds .Values.preStopSleepSeconds $drain) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- end -}}
