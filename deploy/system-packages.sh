#!/usr/bin/env bash
# System packages Mercato needs on Debian/Ubuntu: bubblewrap (the trial sandbox),
# libseccomp2 (compiles the trials' seccomp filter, through pip's pyseccomp), and with
# --test also Chromium (the status-page test) and Slurm with munge (the Slurm executor's
# tests). Idempotent: installs only what is
# missing; uses sudo when not root.
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
libs="$(/sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null || true)"
[[ "$libs" == *libseccomp.so.2* ]] || need+=(libseccomp2)
if [ "${1:-}" = "--test" ]; then
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    # A one-node Slurm cluster for the Slurm executor's tests (deploy/slurm/local-cluster.sh).
    command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
    command -v munged >/dev/null 2>&1 || need+=(munge)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "please install: ${need[*]} (no apt-get here)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
