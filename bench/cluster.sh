#!/usr/bin/env bash
# Cluster benchmark (issue 7): publish -> healthy for N=1 and N=3, lock overhead, and
# kexec versus firmware reboot to healthy. Builds the cluster tier's node images first
# (target/e2e/cluster) and boots QEMU under TCG; prints one table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p imgbuild-tests --bench cluster
