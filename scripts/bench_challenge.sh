#!/usr/bin/env bash
# The NeurIPS 2023 unlearning challenge's forgetting score at N seeded models a side, on the
# embedded default: builtin model, 5 people x 10 facts, forget two people (20 rows, so the KS test
# of forget_quality can take 19 distinct p-values instead of the 10 of one person's rows).
# `sift compare --seeds N`: F with its bootstrap interval for every baseline and for the exact
# path, each beside its ceiling (references against independently seeded references).
#   N=8 (default) on 2 CPU cores: about 2.5 hours (9309 s on 2026-12-06); run it alone.
#   N=64 on a GPU machine: N=64 EXTRA="--batch-size 64" bash scripts/bench_challenge.sh
#   (sift's [compute] picks the GPU; budget several hours on one H100 for 4N + 3N trainings).
# Writes docs/bench/challenge-seeds$N/ (table.md, results.json, tradeoff.png, cost.png), and keeps
# each seeded model's numbers in docs/bench/challenge-seeds$N-models/ (--seeds-cache): a cut run
# resumes when the script is run again (the first, unseeded part of compare, 25-40 min here, runs
# again; every seeded model already measured is read back), and a larger N reuses the first models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
sift=.venv/bin/sift
n=${N:-8}
out=${OUT:-docs/bench}/challenge-seeds$n
cache=${SEEDS_CACHE:-$out-models}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$sift builtin-data --people 5 > "$tmp/rows.jsonl"
$sift builtin-data --people 2 --split holdout > "$tmp/holdout.jsonl"
forget=$(grep -o '"p00[12]-[a-z_]*"' "$tmp/rows.jsonl" | tr -d '"' | paste -sd,)
rm -rf "$out"
start=$(date +%s)
# shellcheck disable=SC2086
$sift compare --data "$tmp/rows.jsonl" --holdout "$tmp/holdout.jsonl" --forget-ids "$forget" \
    --seeds "$n" --seeds-cache "$cache" --max-new-tokens 64 --out "$out" ${EXTRA:-}
echo "wall seconds: $(( $(date +%s) - start ))" | tee "$out/wall.txt"
rm -rf "$out/work"  # the workspaces (GBs); the report stays
echo "report in $out"
