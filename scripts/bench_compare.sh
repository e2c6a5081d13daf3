#!/usr/bin/env bash
# The README's comparison on the embedded default (builtin model, 4 people x 10 facts):
#   1. forget every row of one person (p001): exact path, the five baselines, the stronger
#      methods (WAGLE and its magnitude control, SAM, prune-first, l1-sparse, a coreset) and the
#      relearning attack on each;
#   2. the same forget with unlearning ten times stronger (lr 1e-3): GA, NPO, GradDiff, NPO+SAM
#      and NPO+WAGLE forget more, and the relearning attack shows how much of it comes back;
#   3. a worst-case forget set of 10 rows (the bi-level search) and a random one of the same size,
#      each with NPO and NPO+SAM, to see how much harder the chosen rows are to forget.
# The relearning attack runs at its defaults (half the forget rows, 5 epochs at lr 1e-3).
# Writes docs/bench/compare-*/ (table.md, results.json, plots). About 75 minutes on 2 CPU cores;
# run it alone (it trains and evaluates one model at a time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
sift=.venv/bin/sift
out=${OUT:-docs/bench}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$sift builtin-data --people 4 > "$tmp/rows.jsonl"
$sift builtin-data --people 2 --split holdout > "$tmp/holdout.jsonl"
forget=$(grep -o '"p001-[a-z_]*"' "$tmp/rows.jsonl" | tr -d '"' | paste -sd,)

parts=${PARTS:-1 2 3}  # e.g. PARTS="2 3" to run only those
for part in $parts; do case $part in
1)
rm -rf "$out/compare-person"
$sift compare --data "$tmp/rows.jsonl" --holdout "$tmp/holdout.jsonl" --forget-ids "$forget" \
    --variant npo:sam=0.01 \
    --variant graddiff:mask=wagle,mask_ratio=0.8 --variant graddiff:mask=magnitude,mask_ratio=0.8 \
    --variant npo:mask=wagle,mask_ratio=0.8 --variant graddiff:prune=0.5 --variant l1sparse \
    --variant npo:coreset=0.3 --relearn --max-new-tokens 64 --out "$out/compare-person" ;;
2)
rm -rf "$out/compare-person-strong"
$sift compare --data "$tmp/rows.jsonl" --holdout "$tmp/holdout.jsonl" --forget-ids "$forget" \
    --methods ga,npo,graddiff --variant npo:sam=0.01 --variant npo:mask=wagle,mask_ratio=0.8 \
    --unlearn-lr 1e-3 --relearn --max-new-tokens 64 --out "$out/compare-person-strong" ;;
3)
for kind in worst-case random; do
  rm -rf "$out/compare-$kind"
  $sift compare --data "$tmp/rows.jsonl" --holdout "$tmp/holdout.jsonl" --forget-set "$kind" --size 10 \
      --methods npo --variant npo:sam=0.01 --relearn --max-new-tokens 64 --out "$out/compare-$kind"
done ;;
*) echo "unknown part $part (1, 2 or 3)" >&2; exit 2 ;;
esac; done
rm -rf "$out"/compare-*/work  # the workspaces (GBs); the reports stay
echo "reports in $out/compare-person, $out/compare-person-strong, $out/compare-worst-case, $out/compare-random"
