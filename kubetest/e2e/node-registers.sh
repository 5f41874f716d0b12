#!/usr/bin/env bash
# Opt-in end-to-end check (VM tier, run by hand): a QEMU node built from
# recipes/k8s-node-local.toml registers with a test control plane on the host and goes
# Ready. Measured here (TCG, 2 shared cores): Ready 62 s after the VM started.
#
#   scripts/build-k8s
#   imgbuild build recipes/k8s-node-local.toml -o out
#   cargo build -p imgbuild -p imgkubetest --example control-plane
#   kubetest/e2e/node-registers.sh out/k8s-node-local-1.20.2-1.raw
#
# The control plane listens on 127.0.0.1 only; QEMU user networking lets the guest
# reach it as 10.0.2.2. Instead of `kubeadm join`, a kubelet kubeconfig (admin token,
# CA embedded), a KubeletConfiguration and kubeadm-flags.env (no TLS bootstrap) are
# written into the image's var partition with debugfs. MODIFIES the raw image's var
# partition; the root slots are untouched. Everything else lives in a temp directory.
set -euo pipefail
RAW=${1:?usage: $0 IMAGE.raw}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/debug
KUBECTL=${IMGBUILD_K8S_CACHE:-/var/cache/imgbuild/k8s}/bin/kubectl
W=$(mktemp -d)
CP=; VM=
cleanup() {
  set +e
  if [ -n "$VM" ]; then kill "$VM"; wait "$VM"; fi 2>/dev/null
  if [ -n "$CP" ]; then kill "$CP"; wait "$CP"; fi 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
t0=$(date +%s)

# The control plane stops (and removes its files) on SIGTERM or when its stdin closes:
# a FIFO whose only writer is this script, so it also stops if the script dies.
mkfifo "$W/hold"
exec 4<>"$W/hold"
"$TARGET/examples/control-plane" --guest-kubeconfig "$W/kubelet.conf" < "$W/hold" > "$W/cp.out" 2>&1 &
CP=$!
for _ in $(seq 90); do grep -q "guest kubeconfig" "$W/cp.out" 2>/dev/null && break; sleep 1; done
grep -q "guest kubeconfig" "$W/cp.out" || { cat "$W/cp.out"; exit 1; }
KCFG=$(awk '/^kubeconfig/{print $2}' "$W/cp.out")

cat > "$W/config.yaml" <<'Y'
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
staticPodPath: /etc/kubernetes/manifests
Y
echo 'KUBELET_KUBECONFIG_ARGS=--kubeconfig=/etc/kubernetes/kubelet.conf' > "$W/kubeadm-flags.env"

read -r start size < <(sfdisk -J "$RAW" | jq -r '.partitiontable.partitions[] | select(.name=="var") | "\(.start) \(.size)"')
dd if="$RAW" of="$W/var.ext4" bs=1M iflag=skip_bytes,count_bytes skip=$((start*512)) count=$((size*512)) status=none
debugfs -w "$W/var.ext4" -f - > "$W/debugfs.log" 2>&1 <<D || true
mkdir lib/imgbuild
mkdir lib/imgbuild/etc-kubernetes
rm lib/imgbuild/etc-kubernetes/kubelet.conf
write $W/kubelet.conf lib/imgbuild/etc-kubernetes/kubelet.conf
mkdir lib/kubelet
rm lib/kubelet/config.yaml
write $W/config.yaml lib/kubelet/config.yaml
rm lib/kubelet/kubeadm-flags.env
write $W/kubeadm-flags.env lib/kubelet/kubeadm-flags.env
D
debugfs -R "stat lib/imgbuild/etc-kubernetes/kubelet.conf" "$W/var.ext4" > /dev/null 2>&1 \
  || { cat "$W/debugfs.log"; exit 1; }
dd if="$W/var.ext4" of="$RAW" bs=1M oflag=seek_bytes seek=$((start*512)) conv=notrunc status=none
rm -f "$W/var.ext4"

"$TARGET/imgbuild" run "$RAW" --timeout 600 --serial-log "$W/serial.log" > "$W/run.log" 2>&1 &
VM=$!
tvm=$(date +%s)
for _ in $(seq 100); do
  if "$KUBECTL" --kubeconfig "$KCFG" get nodes 2>/dev/null | grep -q " Ready "; then
    echo "node Ready $(( $(date +%s) - tvm )) s after the VM started ($(( $(date +%s) - t0 )) s in all)"
    "$KUBECTL" --kubeconfig "$KCFG" get nodes -o wide
    exit 0
  fi
  sleep 3
done
echo "node did not become Ready; last serial lines:" >&2
tail -20 "$W/serial.log" >&2
exit 1
