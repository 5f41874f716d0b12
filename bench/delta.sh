#!/usr/bin/env bash
# bench/delta.sh — delta size and apply cost against the reference tools, as one table.
#
#   bench/delta.sh OLD.img NEW.img [OLD_TREE NEW_TREE]
#
# OLD/NEW are two ext4 root images (defaults: $BENCH_DIR/old.img and new.img, i.e. two
# builds of the minimal recipe, one from the Debian point release, one adding the
# security/updates suites; bench/make-pair.sh makes such a pair). The trees, when given
# (defaults: $BENCH_DIR/old and new if they exist), feed the OSTree static delta reference.
# Environment: WORK (scratch dir, default: mktemp under /tmp), SKIP_SLOW=1 skips the
# zstd -19 full-image and --patch-from figures (tens of minutes on 2 busy cores; ZSTD_THREADS
# sets zstd -T, default 1); APPLY_ONLY=1 makes our delta and prints only the apply table (for
# a timing run on an otherwise idle machine).
# It prints figures and never asserts speed.
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/delta-bench/real}
OLD=${1:-$BENCH_DIR/old.img}
NEW=${2:-$BENCH_DIR/new.img}
OLD_TREE=${3:-$BENCH_DIR/old}
NEW_TREE=${4:-$BENCH_DIR/new}
WORK=${WORK:-$(mktemp -d /tmp/delta-bench.XXXXXX)}
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"

echo "# building delta_tool (release)" >&2
TOOL=$(cd "$REPO_ROOT" && cargo bench -p imgbuild --bench delta_tool --no-run \
        --message-format=json 2>/dev/null |
       jq -r 'select(.executable != null and .target.name == "delta_tool") | .executable' |
       tail -1)
[ -x "$TOOL" ] || { echo "delta_tool not built" >&2; exit 1; }

size() { stat -c %s "$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.2f MB (%d bytes)", b / 1e6, b }'; }
# time_v CMD... : run under /usr/bin/time -v (stdout to $WORK/cmd.out), print
# "seconds maxrss_kib"
time_v() {
    /usr/bin/time -v -o "$WORK/time.txt" "$@" > "$WORK/cmd.out"
    awk -F': ' '/Elapsed/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i] }
               /Maximum resident/ { r = $2 } END { printf "%.2f %d\n", s, r }' "$WORK/time.txt"
}

IMG_SIZE=$(size "$NEW")
declare -A R

if [ "${APPLY_ONLY:-0}" = 1 ]; then
    SKIP_SLOW=1
fi
if [ "${SKIP_SLOW:-0}" != 1 ]; then
    echo "# zstd -19 (full image)" >&2
    zstd -q -19 -T"${ZSTD_THREADS:-1}" -c "$NEW" > "$WORK/full.zst"
    R[full]=$(size "$WORK/full.zst")
    echo "# zstd -19 --long=31 --patch-from" >&2
    zstd -q -19 -T"${ZSTD_THREADS:-1}" --long=31 --patch-from="$OLD" -c "$NEW" > "$WORK/patch.zst"
    R[patch]=$(size "$WORK/patch.zst")
    read -r s rss < <(time_v zstd -q -d -f --long=31 --patch-from="$OLD" "$WORK/patch.zst" -o /dev/null)
    R[patch_apply]="$s s, max RSS $((rss / 1024)) MiB"
    rm -f "$WORK/full.zst" "$WORK/patch.zst"
fi

if [ "${APPLY_ONLY:-0}" != 1 ]; then
    echo "# xdelta3 -9" >&2
    xdelta3 -9 -f -e -s "$OLD" "$NEW" "$WORK/x.vcdiff"
    R[xdelta]=$(size "$WORK/x.vcdiff")
    rm -f "$WORK/x.vcdiff"
fi

if [ "${APPLY_ONLY:-0}" != 1 ] && [ -d "$OLD_TREE" ] && [ -d "$NEW_TREE" ]; then
    echo "# OSTree static delta" >&2
    rm -rf "$WORK/repo"
    ostree init --repo="$WORK/repo" --mode=archive
    # OSTree holds regular files and symlinks only: commit a hard-linked copy of each tree
    # without its device nodes, fifos and sockets (as an OSTree-based OS ships its /dev
    # empty).
    for t in old new; do
        [ $t = old ] && dir=$OLD_TREE || dir=$NEW_TREE
        rm -rf "$WORK/tree-$t"
        cp -al "$dir" "$WORK/tree-$t"
        find "$WORK/tree-$t" \( -type c -o -type b -o -type p -o -type s \) -delete
        ostree commit --repo="$WORK/repo" --branch=$t --tree=dir="$WORK/tree-$t" -s $t >/dev/null
        rm -rf "$WORK/tree-$t"
    done
    ostree static-delta generate --repo="$WORK/repo" --from=old --to=new > "$WORK/ostree.log" 2>&1
    R[ostree]=$(du -sb "$WORK/repo/deltas" | cut -f1)
    rm -rf "$WORK/repo"
fi

echo "# our delta" >&2
read -r s rss < <(time_v "$TOOL" make "$OLD" "$NEW" "$WORK/ours.delta")
MAKE=$(cat "$WORK/cmd.out")
R[ours]=$(size "$WORK/ours.delta")
R[make]="$s s, max RSS $((rss / 1024)) MiB"
if [ "${APPLY_ONLY:-0}" != 1 ]; then
    "$TOOL" make "$OLD" "$NEW" "$WORK/blocks.delta" --no-file-diff > "$WORK/blocks.txt"
    R[blocks]=$(size "$WORK/blocks.delta")
    rm -f "$WORK/blocks.delta"
fi

echo "# apply vs dd (same target file, warm page cache for both)" >&2
apply_row() { # label, extra args
    local label=$1
    shift
    rm -f "$WORK/target.img"
    local out
    out=$(/usr/bin/time -v -o "$WORK/time.txt" "$TOOL" apply "$OLD" "$WORK/ours.delta" "$WORK/target.img" "$@")
    local rss secs anon
    rss=$(awk -F': ' '/Maximum resident/ { print $2 }' "$WORK/time.txt")
    secs=$(echo "$out" | sed -n 's/.*apply_seconds=\([0-9.]*\).*/\1/p')
    anon=$(echo "$out" | sed -n 's/.*peak_rss_anon_kib=\([0-9]*\).*/\1/p')
    cmp -s "$WORK/target.img" "$NEW" || { echo "APPLY RESULT DIFFERS" >&2; exit 1; }
    printf '%s|%s s|%.0f MiB/s|%d MiB|%d MiB\n' "$label" "$secs" \
        "$(awk -v b="$IMG_SIZE" -v s="$secs" 'BEGIN { print b / s / 1048576 }')" \
        $((rss / 1024)) $((anon / 1024))
}
dd_row() { # label, extra dd args
    local label=$1
    shift
    rm -f "$WORK/target.img"
    local s rss
    read -r s rss < <(time_v dd if="$NEW" of="$WORK/target.img" bs=1M status=none "$@")
    printf '%s|%s s|%.0f MiB/s|%d MiB|-\n' "$label" "$s" \
        "$(awk -v b="$IMG_SIZE" -v s="$s" 'BEGIN { print b / s / 1048576 }')" $((rss / 1024))
}
ROWS=$(dd_row "dd bs=1M"
       apply_row "apply (verify source)"
       apply_row "apply (source hashed concurrently)" --concurrent-verify
       apply_row "apply (source pre-verified)" --no-verify-source
       dd_row "dd bs=1M conv=fsync" conv=fsync
       apply_row "apply (verify source) + fsync" --fsync
       apply_row "apply (hashed concurrently) + fsync" --concurrent-verify --fsync)
rm -f "$WORK/target.img"

echo
echo "Images: $OLD -> $NEW ($(mb "$IMG_SIZE") each)"
echo
if [ "${APPLY_ONLY:-0}" != 1 ]; then
printf '%-44s %s\n' "what" "size"
printf '%-44s %s\n' "full image, zstd -19" "${R[full]:+$(mb "${R[full]}")}"
printf '%-44s %s\n' "zstd -19 --long=31 --patch-from" "${R[patch]:+$(mb "${R[patch]}")}${R[patch_apply]:+  (apply: ${R[patch_apply]})}"
printf '%-44s %s\n' "xdelta3 -9" "$(mb "${R[xdelta]}")"
printf '%-44s %s\n' "OSTree static delta (root trees)" "${R[ostree]:+$(mb "${R[ostree]}")}"
printf '%-44s %s\n' "ours, block level only" "$(mb "${R[blocks]}")"
printf '%-44s %s\n' "ours (file diffs + blocks)" "$(mb "${R[ours]}")  (make: ${R[make]})"
echo "  block level: $(cat "$WORK/blocks.txt")"
echo "  file level:  $MAKE"
echo
fi
printf '%-34s %-10s %-12s %-14s %s\n' "apply" "time" "throughput" "max RSS" "peak anon RSS"
echo "$ROWS" | while IFS='|' read -r a b c d e; do
    printf '%-34s %-10s %-12s %-14s %s\n' "$a" "$b" "$c" "$d" "$e"
done
rm -f "$WORK/ours.delta"
