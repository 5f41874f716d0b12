#!/usr/bin/env bash
# bench/chunks.sh — what a node fetches by each update path, as one table (issue #4).
#
#   bench/chunks.sh OLD.img NEW.img
#
# For the pair OLD -> NEW (two ext4 root images; defaults as in bench/delta.sh):
#   - the full image: one zstd frame (the pre-pack publish) and the chunk pack for each
#     smallest frame size in FRAMES (KiB, default 0,16,64,256; 0 = one frame per chunk),
#     with the pack's overhead over the single frame;
#   - the chunk path of a node on OLD without a delta: frames it fetches (Range requests,
#     coalesced as imgupdate does) plus the two chunk indexes it reads;
#   - our delta OLD -> NEW (DELTA=0 skips it) and, with PATCH_FROM=1, zstd -19 --long=31
#     --patch-from (slow: minutes and ~3 GB RSS for 1.5 GiB images).
# Environment: LEVEL (zstd level, default 19 as `imgbuild publish`), THREADS (pack
# compression threads, default 2), WORK (scratch dir). Prints figures, asserts nothing.
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/delta-bench/real}
OLD=${1:-$BENCH_DIR/old.img}
NEW=${2:-$BENCH_DIR/new.img}
LEVEL=${LEVEL:-19}
FRAMES=${FRAMES:-0,16,64,256}
THREADS=${THREADS:-2}
WORK=${WORK:-$(mktemp -d /tmp/chunks-bench.XXXXXX)}
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"

echo "# building delta_tool (release)" >&2
TOOL=$(cd "$REPO_ROOT" && cargo bench -p imgbuild --bench delta_tool --no-run \
        --message-format=json 2>/dev/null |
       jq -r 'select(.executable != null and .target.name == "delta_tool") | .executable' |
       tail -1)
[ -x "$TOOL" ] || { echo "delta_tool not built" >&2; exit 1; }

mb() { awk -v b="$1" 'BEGIN { printf "%.2f MB", b / 1e6 }'; }
kv() { sed -n "s/.*\\b$2=\\([0-9.]*\\).*/\\1/p" <<<"$1"; }

echo "# chunk packs of NEW at level $LEVEL, frames $FRAMES KiB" >&2
"$TOOL" pack "$OLD" "$NEW" --level "$LEVEL" --threads "$THREADS" --frames "$FRAMES" --single \
    --save-index "$WORK/index" > "$WORK/pack.txt"
HEAD=$(head -1 "$WORK/pack.txt")
SINGLE=$(kv "$(grep '^single_frame' "$WORK/pack.txt")" bytes)
INDEX_V1=$(kv "$HEAD" index_v1_json)

DELTA_SIZE=
if [ "${DELTA:-1}" = 1 ]; then
    echo "# our delta" >&2
    OUT=$("$TOOL" make "$OLD" "$NEW" "$WORK/ours.delta" --level "$LEVEL")
    DELTA_SIZE=$(kv "$OUT" delta_size)
    rm -f "$WORK/ours.delta"
fi
PATCH_SIZE=
if [ "${PATCH_FROM:-0}" = 1 ]; then
    echo "# zstd -19 --long=31 --patch-from" >&2
    /usr/bin/time -v -o "$WORK/time.txt" zstd -q -19 -T1 --long=31 --patch-from="$OLD" \
        -c "$NEW" > "$WORK/patch.zst"
    PATCH_SIZE=$(stat -c %s "$WORK/patch.zst")
    PATCH_RSS=$(awk -F': ' '/Maximum resident/ { print int($2 / 1024) }' "$WORK/time.txt")
    rm -f "$WORK/patch.zst"
fi

echo
echo "Images: $OLD -> $NEW ($(mb "$(kv "$HEAD" image_bytes)") each, $(kv "$HEAD" chunks) chunks;"
echo "        $(kv "$HEAD" missing_chunks) chunks / $(mb "$(kv "$HEAD" missing_raw_bytes)") of NEW are not in OLD)"
echo
printf '%-40s %14s %10s %12s %12s %14s %9s\n' "zstd -$LEVEL" "full image" "overhead" "index" \
    "index.zst" "chunk fetch" "requests"
printf '%-40s %14s %10s %12s %12s %14s %9s\n' "single frame (before the pack)" "$(mb "$SINGLE")" "-" \
    "$(mb "$INDEX_V1")" "-" "(whole image)" "-"
grep '^pack ' "$WORK/pack.txt" | while read -r line; do
    min=$(sed -n 's/.*min_frame=\([0-9]*K\).*/\1/p' <<<"$line")
    pack=$(kv "$line" pack_bytes)
    index=$(kv "$line" index_json)
    fetch=$(kv "$line" fetch_bytes_capped)
    req=$(kv "$line" requests_capped)
    zindex=$(zstd -19 -q -c "$WORK/index.$min.json" | wc -c)
    printf '%-40s %14s %9.1f%% %12s %12s %14s %9s\n' "chunk pack, frames >= $min ($(kv "$line" frames))" \
        "$(mb "$pack")" "$(awk -v p="$pack" -v s="$SINGLE" 'BEGIN { print (p / s - 1) * 100 }')" \
        "$(mb "$index")" "$(mb "$zindex")" "$(mb "$((fetch + 2 * index))")" "$req"
    rm -f "$WORK/index.$min.json"
done
echo "  chunk fetch = frames fetched by Range (gaps <= 4 KiB merged, <= 1024 requests)"
echo "                + the chunk indexes of NEW and OLD (as published: uncompressed JSON)"
[ -n "$DELTA_SIZE" ] && printf '%-40s %14s\n' "our delta OLD -> NEW" "$(mb "$DELTA_SIZE")"
[ -n "$PATCH_SIZE" ] && printf '%-40s %14s  (max RSS %s MiB)\n' "zstd -19 --long=31 --patch-from" \
    "$(mb "$PATCH_SIZE")" "$PATCH_RSS"
echo
cat "$WORK/pack.txt"
