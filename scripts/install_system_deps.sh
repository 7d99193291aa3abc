#!/usr/bin/env bash
# Debian packages the integration tests need (Slurm + munge for launch.sh, ffmpeg is bundled by
# imageio-ffmpeg). Idempotent; skipped when already present or when not root.
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "install_system_deps: not root, skipping ${need[*]} (Slurm tests will be skipped)" >&2
  fi
fi
