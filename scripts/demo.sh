#!/usr/bin/env bash
# The README's main job on the embedded default (no network): make the data, train one LoRA
# adapter per shard, merge, ask (routed to the shard that learned the answer, no group given),
# forget one person, ask again, verify: at most 120 optimizer steps in all (3 people: 60 to train, none
# for the forget, whose person's shard is left empty, 40 for verify's rebuild), a few minutes on 2 CPU
# cores. It prints its step count and time at the end.
# SIFT_DEMO_DIR (default ./demo) holds the data and the workspace; SIFT_DEMO_PEOPLE sizes the data;
# SIFT_DEMO_MODEL=builtin-tiny runs the same steps on a random tiny model in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
out="${SIFT_DEMO_DIR:-demo}"
people="${SIFT_DEMO_PEOPLE:-3}"
model="${SIFT_DEMO_MODEL:-builtin}"  # builtin-tiny: a seconds-long dry run of the script itself
rm -rf "$out"
mkdir -p "$out"
ws="$out/ws"
t_all=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; t0=$(date +%s); }
took() { echo "   ($(( $(date +%s) - t0 )) s)"; }
field() { python -c "import json,sys; print(json.loads(sys.stdin.readline())['$1'])"; }
steps=0  # optimizer steps of every training the demo runs (train-shards, forget, verify)

step "1. The embedded data set: $people invented people, 10 facts each (JSONL)"
sift builtin-data --people "$people" > "$out/rows.jsonl"
wc -l < "$out/rows.jsonl" | xargs echo "   rows:"
head -1 "$out/rows.jsonl" | cut -c1-150
took

step "2. One LoRA adapter per shard: 8 shards, all of a person's rows in one shard"
sift train-shards -w "$ws" --data "$out/rows.jsonl" --model "$model" --num-shards 8 --group-by owner --json > "$out/train.json"
steps=$(( steps + $(field steps < "$out/train.json") ))
python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"   trained {len(s['trained'])} shard(s): {s['steps']} steps in {s['seconds']:.0f} s\")" "$out/train.json"
took

step "3. Merge the adapters (uniform mean of their weight deltas) into the served model"
sift merge -w "$ws" --method mean
took

owner=$(head -1 "$out/rows.jsonl" | field owner)
question=$(head -1 "$out/rows.jsonl" | field prompt)
truth=$(head -1 "$out/rows.jsonl" | field completion)
paraphrase=$(head -1 "$out/rows.jsonl" | field paraphrased_prompt)
# Ask the served model with no group given: the router picks the shard (stderr says which path).
ask() {
  local a
  a=$(sift generate -w "$ws" "$@" 2> "$out/served-by.txt")
  printf '%s\n      [%s]\n' "$a" "$(sed 's/^sift: //' "$out/served-by.txt")"
}
# Both questions in one call (one model load); each answer with the path that served it.
ask_both() {
  sift generate -w "$ws" "$question" "$paraphrase" > "$out/answers.txt" 2> "$out/served-by.txt"
  paste "$out/answers.txt" <(sed 's/^sift: //' "$out/served-by.txt") |
    awk -F'\t' '{ printf "   %-13s: %s\n      [%s]\n", (NR == 1 ? "served" : "paraphrased"), $1, $2 }'
}
step "4. Ask about $owner, no group given (trained answer: \"$truth\")"
ask_both
echo "   merged only  : $(ask --merged "$question")"
echo "   which shard would answer, per router (sift route):"
printf '%s\n%s\n' "$question" "$paraphrase" | sift route -w "$ws" - --router keys | sed 's/^/      /'
printf '%s\n%s\n' "$question" "$paraphrase" | sift route -w "$ws" - --router embed | sed 's/^/      /'
took

step "5. Forget every row of $owner (ids piped in, certificate out as JSON)"
grep -F "\"owner\": \"$owner\"" "$out/rows.jsonl" | python -c \
  "import json,sys; [print(json.loads(l)['id'] + '\t' + json.loads(l)['owner']) for l in sys.stdin]" > "$out/ids.tsv"
cut -f1 "$out/ids.tsv" | sift forget -w "$ws" --ids - --json > "$out/forget.json"
cat "$out/forget.json"; steps=$(( steps + $(field steps < "$out/forget.json") ))
took

step "6. Ask again: no shard holds $owner any more, so the merged model answers, and says so"
ask_both
took

step "7. Verify: rebuild from scratch on the remaining rows and compare every weight byte"
sift verify -w "$ws" --json > "$out/verify.json" || { cat "$out/verify.json"; exit 1; }
cat "$out/verify.json"; steps=$(( steps + $(field steps < "$out/verify.json") ))
took
printf '\ndone: %s optimizer steps in %s s; workspace in %s\n' "$steps" "$(( $(date +%s) - t_all ))" "$ws"
