#!/usr/bin/env bash
# Restores a backup into this host's aggregator, which must be stopped and empty; then starts it.
#
#   scripts/restore.sh s3://bucket/akosha-backups [--at 2026-11-20T02:15:00Z]
#
# Same settings as scripts/backup.sh (AKOSHA_BACKUP_OPTIONS, AKOSHA_CONFIG). Set AKOSHA_RESTORE_START=0 to leave
# the aggregator stopped afterwards; AKOSHA_SERVICE names its systemd unit (default akosha-aggregator).
set -euo pipefail
url="${1:-${AKOSHA_BACKUP_URL:-}}"
if [[ -z "$url" ]]; then
  echo "usage: $0 <url> [--at <time>]   (or set AKOSHA_BACKUP_URL)" >&2
  exit 2
fi
shift || true
bin="${AKOSHA_AGGREGATOR_BIN:-akosha-aggregator}"
args=(restore "$url" "$@")
for option in ${AKOSHA_BACKUP_OPTIONS:-}; do
  args+=(--option "$option")
done
service="${AKOSHA_SERVICE:-akosha-aggregator}"
if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
  echo "stop $service first (a restore needs a stopped, empty aggregator)" >&2
  exit 1
fi
"$bin" "${args[@]}"
if [[ "${AKOSHA_RESTORE_START:-1}" == 1 ]] && command -v systemctl >/dev/null; then
  systemctl start "$service"
fi
