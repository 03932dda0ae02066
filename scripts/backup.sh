#!/usr/bin/env bash
# Backs up the running aggregator and keeps the newest backups: the entry point for cron, the systemd timer
# (config/systemd/akosha-backup.timer) and the Kubernetes CronJob (config/kubernetes/backup-cronjob.yaml).
#
#   AKOSHA_BACKUP_URL=s3://bucket/akosha-backups scripts/backup.sh       # or: scripts/backup.sh <url>
#   crontab:  15 2 * * *  AKOSHA_BACKUP_URL=s3://… /opt/akosha/scripts/backup.sh >>/var/log/akosha-backup.log 2>&1
#
# Settings (environment): AKOSHA_BACKUP_KEEP (newest backups kept, default 14), AKOSHA_BACKUP_OPTIONS
# (space-separated key=value store options, e.g. "endpoint=http://minio:9000 allow_http=true"),
# AKOSHA_AGGREGATOR_URL (HTTP API, default: the configuration's http.listen), AKOSHA_CONFIG, AKOSHA_TOKEN (admin).
# The aggregator writes the backup, so it needs the store's credentials (AWS_*, GOOGLE_*, AZURE_* or options);
# pruning old backups runs here and needs them too. Exit status: 0 only when the backup is complete.
set -euo pipefail
url="${1:-${AKOSHA_BACKUP_URL:-}}"
if [[ -z "$url" ]]; then
  echo "usage: $0 <url>   (or set AKOSHA_BACKUP_URL)" >&2
  exit 2
fi
bin="${AKOSHA_AGGREGATOR_BIN:-akosha-aggregator}"
args=(backup "$url" --keep "${AKOSHA_BACKUP_KEEP:-14}")
for option in ${AKOSHA_BACKUP_OPTIONS:-}; do
  args+=(--option "$option")
done
if [[ -n "${AKOSHA_AGGREGATOR_URL:-}" ]]; then
  args+=(--aggregator-url "$AKOSHA_AGGREGATOR_URL")
fi
echo "$(date -u +%FT%TZ) backup to $url"
exec "$bin" "${args[@]}"
