#!/usr/bin/env bash
# bench/make-pair.sh DIR — a realistic security-update pair of root trees and ext4 images:
#   DIR/old, DIR/old.img: bookworm (point release) minbase + systemd + kernel
#   DIR/new, DIR/new.img: the same plus bookworm-security and bookworm-updates
# Images are reproducible (fixed UUID, hash seed and time). Needs root (mmdebstrap root
# mode). APT_CACHE (default /var/cache/imgbuild-test/apt, if present) seeds the downloads;
# it is only read.
set -euo pipefail
DIR=${1:-/tmp/delta-bench/real}
SIZE=${SIZE:-1536M}
APT_CACHE=${APT_CACHE:-/var/cache/imgbuild-test/apt}
MIRROR=http://deb.debian.org/debian
mkdir -p "$DIR"
hooks=(--setup-hook='mkdir -p "$1"/var/cache/apt/archives/')
if [ -d "$APT_CACHE" ]; then
    hooks+=(--setup-hook="sync-in $APT_CACHE /var/cache/apt/archives/")
fi
common=(--variant=minbase --include=systemd,systemd-sysv,linux-image-amd64,initramfs-tools "${hooks[@]}")

mkimg() {
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -I 256 \
        -U 3c1f7e1a-8d2b-4f6e-9a0c-5b7d3e1f2a4c \
        -E hash_seed=8a2e4c6d-1b3f-4a5c-9e7d-2f4a6c8e0b1d,root_owner=0:0 \
        -d "$1" "$2" "$SIZE"
}

rm -rf "$DIR/old" "$DIR/new"
mmdebstrap "${common[@]}" bookworm "$DIR/old" "deb $MIRROR bookworm main"
mmdebstrap "${common[@]}" bookworm "$DIR/new" \
    "deb $MIRROR bookworm main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    "deb $MIRROR bookworm-updates main"
mkimg "$DIR/old" "$DIR/old.img"
mkimg "$DIR/new" "$DIR/new.img"
ls "$DIR/old/usr/lib/modules" "$DIR/new/usr/lib/modules"
du -sh "$DIR/old" "$DIR/new"
