"""SIGKILL crash harness: kill `sift train-shards`, `sift merge`, `sift forget` and `sift add`
at random moments, rerun the same command, and check that the workspace ends byte for byte where an
uninterrupted run ends.

For each command a reference run goes uninterrupted from a prepared starting workspace. Then,
`--kills` times: copy the starting workspace, start the command, SIGKILL its process group after
a random delay drawn over the reference run's working time, check what a reader would find
(the served folder, if any, must be whole: every tensor hashes to the served record), rerun the
same command to completion, and compare every file of the workspace with the reference run's.
Files that record wall-clock facts (training seconds, ledger times, the random ledger salt of a
new workspace) are compared with those fields left out; everything else, hidden staging files
included, must match.

    python scripts/crash_harness.py                        # embedded default: builtin model, 20 kills each
    python scripts/crash_harness.py --model builtin-tiny --kills 3   # what the default test run does
    python scripts/crash_harness.py --model builtin-tiny --slices 2 --commands forget --kills 0 --repeats 40
                                    # no kills: is the command itself bit-stable between processes?

Prints a table (kills landed, kills that left a half-done workspace, reruns that matched) and
exits 1 on any mismatch. One command at a time: the kills need the cores to themselves to land
at spread-out points of the work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VOLATILE = {
    "seconds",
    "time",
    "started",
    "forget_id",
    "add_id",
    "entry_sha256",
    "previous_sha256",
    "ledger_head",
    "ledger_salt",
}
SKIP = {".lock"}
SKIP_DIRS = {".locks"}
JSON_RECORDS = {"sift-meta.json", "state.json"}


def _normalise(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _normalise(v) for k, v in sorted(obj.items()) if k not in VOLATILE}
    if isinstance(obj, list):
        return [_normalise(v) for v in obj]
    return obj


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under root -> a hash of its content; records of wall-clock facts hashed with
    those fields dropped. Leftover staging files show up as extra names."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.name in SKIP or rel.parts[0] in SKIP_DIRS:
            continue
        data = path.read_bytes()
        if path.name in JSON_RECORDS or path.name == "ledger.jsonl":
            try:
                if path.name == "ledger.jsonl":
                    parsed: Any = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                else:
                    parsed = json.loads(data)
                data = json.dumps(_normalise(parsed), sort_keys=True).encode()
            except (ValueError, UnicodeDecodeError):
                pass  # a damaged record hashes as its bytes and will not match
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


def served_folder_whole(ws: Path) -> str | None:
    """None when the served folder is absent or whole (its tensors hash to the served record);
    otherwise what a reader would have found wrong."""
    from sift.merge.driver import served_hashes, served_info
    from sift.workspace import Workspace

    w = Workspace(ws)
    if not w.merged_dir.exists():
        return None
    try:
        info = served_info(w)
        if info is None:
            return "served folder without its record"
        overall, _ = served_hashes(w.merged_dir)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a finding
        return f"served folder unreadable: {exc}"
    return None if overall == info.get("served_sha256") else "served tensors do not match their record"


@dataclass
class Scenario:
    name: str
    args: list[str]  # the sift command, with {ws} and {data} placeholders
    prepare: list[list[str]] = field(default_factory=list)  # commands that make the starting workspace


@dataclass
class Outcome:
    command: str
    kills: int = 0  # the process was running when the kill came
    finished_first: int = 0  # the process ended before its kill time (no kill)
    mid_work: int = 0  # the kill left the workspace neither as it started nor as it ends
    reader_findings: list[str] = field(default_factory=list)
    rerun_failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    reference_seconds: float = 0.0
    repeats: int = 0  # uninterrupted runs from the same start, compared like the reruns
    repeat_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.reader_findings or self.rerun_failures or self.mismatches or self.repeat_mismatches)


def _sift(args: list[str], ws: Path, data: Path) -> list[str]:
    """The command line; {head} and {tail} name the data set without its last person and that
    person alone (make_rows writes both beside it): add's starting data and what it adds."""
    named = {"ws": ws, "data": data, "head": part_path(data, "head"), "tail": part_path(data, "tail")}
    return [sys.executable, "-m", "sift.cli", *[a.format(**named) for a in args]]


def part_path(data: Path, part: str) -> Path:
    return data.with_name(f"{data.stem}-{part}{data.suffix}")


def _run(args: list[str], ws: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_sift(args, ws, data), capture_output=True, text=True, timeout=3600)


def scenarios(model: str, shards: int, epochs: int, slices: int, forget_ids: str) -> list[Scenario]:
    train = [
        "train-shards",
        "-w",
        "{ws}",
        "--data",
        "{data}",
        "--model",
        model,
        "--num-shards",
        str(shards),
        "--group-by",
        "owner",
        "--epochs",
        str(epochs),
        "--slices",
        str(slices),
    ]
    train_head = [a if a != "{data}" else "{head}" for a in train]
    return [
        Scenario("train-shards", train),
        Scenario("merge", ["merge", "-w", "{ws}"], prepare=[train]),
        Scenario("forget", ["forget", "-w", "{ws}", "--ids", forget_ids], prepare=[train, ["merge", "-w", "{ws}"]]),
        Scenario("add", ["add", "-w", "{ws}", "--data", "{tail}"], prepare=[train_head, ["merge", "-w", "{ws}"]]),
    ]


def startup_seconds() -> float:
    """How long a sift process takes before it can do work (imports): kills land after it."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, sift.cli"], check=True)
    return time.perf_counter() - t


def run_scenario(
    sc: Scenario,
    data: Path,
    kills: int,
    rng: random.Random,
    work: Path,
    startup: float,
    log=print,
    keep: Path | None = None,
    repeats: int = 0,
) -> Outcome:
    out = Outcome(sc.name)
    start = work / f"{sc.name}-start" / "ws"
    start.parent.mkdir(parents=True)
    for cmd in sc.prepare:
        p = _run(cmd, start, data)
        if p.returncode != 0:
            raise RuntimeError(f"preparing {sc.name}: {' '.join(cmd)} failed:\n{p.stderr}")
    begin = fingerprint(start)
    ref = work / f"{sc.name}-reference" / "ws"
    _copy(start, ref)
    t = time.perf_counter()
    p = _run(sc.args, ref, data)
    out.reference_seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"reference {sc.name} failed:\n{p.stderr}")
    expected = fingerprint(ref)
    low = min(startup * 0.8, out.reference_seconds * 0.5)
    for i in range(kills):
        trial = work / f"{sc.name}-kill-{i:02d}" / "ws"
        _copy(start, trial)
        delay = rng.uniform(low, out.reference_seconds)
        err_path = trial.parent / "first-run.stderr"
        with err_path.open("w") as err:
            proc = subprocess.Popen(
                _sift(sc.args, trial, data), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        try:
            proc.wait(timeout=delay)
            out.finished_first += 1
            what = "finished before the kill"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.kills += 1
            what = "killed"
        first_err = err_path.read_text(errors="replace")
        after_kill = fingerprint(trial)
        if after_kill not in (begin, expected):
            out.mid_work += 1
        finding = served_folder_whole(trial)
        if finding:
            out.reader_findings.append(f"kill {i} at {delay:.2f}s: {finding}")
        p = _run(sc.args, trial, data)
        if p.returncode != 0:
            out.rerun_failures.append(f"kill {i} at {delay:.2f}s: rerun exit {p.returncode}: {p.stderr.strip()[-300:]}")
        else:
            differs = _differs(trial, ref, expected, keep / f"{sc.name}-kill-{i:02d}" if keep else None, first_err)
            if differs:
                out.mismatches.append(
                    f"kill {i} at {delay:.2f}s: {differs} [first run's stderr: {first_err.strip()[-400:]}]"
                )
        log(
            f"{sc.name}: kill {i + 1}/{kills} at {delay:.2f}s of {out.reference_seconds:.2f}s: {what}; "
            f"{'OK' if out.ok else 'FAIL'}"
        )
        shutil.rmtree(trial.parent)
    # Without any kill: does the command write the same bytes every time it runs in a fresh
    # process? A kill trial that ends in other bytes means little unless the answer is yes.
    for i in range(repeats):
        trial = work / f"{sc.name}-repeat-{i:02d}" / "ws"
        _copy(start, trial)
        p = _run(sc.args, trial, data)
        out.repeats += 1
        if p.returncode != 0:
            out.rerun_failures.append(f"repeat {i}: exit {p.returncode}: {p.stderr.strip()[-300:]}")
        elif differs := _differs(trial, ref, expected, keep / f"{sc.name}-repeat-{i:02d}" if keep else None):
            out.repeat_mismatches.append(f"repeat {i}: {differs}")
        log(f"{sc.name}: uninterrupted repeat {i + 1}/{repeats}: {'OK' if out.ok else 'FAIL'}")
        shutil.rmtree(trial.parent)
    return out


def _differs(trial: Path, ref: Path, expected: dict[str, str], keep: Path | None, first_err: str | None = None) -> str:
    """'' when the trial's files equal the reference's; else which files differ (and the JSON
    fields that do), the trial and the reference copied side by side to `keep`."""
    got = fingerprint(trial)
    if got == expected:
        return ""
    diff = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
    detail = "; ".join(_json_diff(trial / k, ref / k) for k in diff if k.endswith(".json"))
    if keep is not None:  # keep the evidence
        shutil.copytree(trial, keep / "trial", symlinks=True)
        shutil.copytree(ref, keep / "reference", symlinks=True)
        if first_err is not None:
            (keep / "first-run.txt").write_text(first_err)
    return f"{len(diff)} file(s) differ: {diff} {detail}"


def _json_diff(a: Path, b: Path) -> str:
    """Which top-level fields of two JSON records differ (clock fields left out)."""
    try:
        x, y = _normalise(json.loads(a.read_text())), _normalise(json.loads(b.read_text()))
    except (OSError, ValueError):
        return f"{a.name}: unreadable"
    if not (isinstance(x, dict) and isinstance(y, dict)):
        return f"{a.name}: differs"
    keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    return f"{a.parent.name}/{a.name}: " + ", ".join(f"{k} {str(x.get(k))[:60]} vs {str(y.get(k))[:60]}" for k in keys)


def _copy(src: Path, dst: Path) -> None:
    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    dst.parent.mkdir(parents=True)
    if src.exists():
        shutil.copytree(src, dst, symlinks=True)


def make_rows(path: Path, people: int) -> None:
    """The builtin rows of `people` people, and beside them the same without the last person
    ({head}) and that person's rows alone ({tail})."""
    from sift.builtin.facts import make_rows as rows

    made = rows(people=people, seed=0)
    last = made[-1]["owner"]

    def write(target: Path, chosen: list[dict]) -> None:
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))

    write(path, made)
    write(part_path(path, "head"), [r for r in made if r["owner"] != last])
    write(part_path(path, "tail"), [r for r in made if r["owner"] == last])


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| command | reference s | kills landed | finished before the kill | kills mid-work | reader saw half a model | reruns failed | reruns differing | uninterrupted repeats (differing) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.command} | {o.reference_seconds:.1f} | {o.kills} | {o.finished_first} | {o.mid_work} | "
            f"{len(o.reader_findings)} | {len(o.rerun_failures)} | {len(o.mismatches)} | {o.repeats} ({len(o.repeat_mismatches)}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--kills", type=int, default=20, help="random kill times per command")
    ap.add_argument("--people", type=int, default=4, help="builtin data: invented people, 10 rows each")
    ap.add_argument("--num-shards", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--slices", type=int, default=1)
    ap.add_argument("--commands", default="train-shards,merge,forget,add")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="also run each command this many times uninterrupted from the same start; all must equal the reference",
    )
    ap.add_argument(
        "--keep-failures", type=Path, default=None, help="copy each mismatching trial and the reference here"
    )
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    wanted = args.commands.split(",")
    with tempfile.TemporaryDirectory(prefix="sift-crash-") as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        make_rows(data, args.people)
        startup = startup_seconds()
        print(
            f"startup (imports) {startup:.2f}s; kills drawn between {startup * 0.8:.2f}s and each reference run's end",
            flush=True,
        )
        outcomes = [
            run_scenario(
                sc,
                data,
                args.kills,
                rng,
                work,
                startup,
                log=lambda m: print(m, flush=True),
                keep=args.keep_failures,
                repeats=args.repeats,
            )
            for sc in scenarios(
                args.model, args.num_shards, args.epochs, args.slices, "p000-pet,p001-pet,p002-birthplace"
            )
            if sc.name in wanted
        ]
    print()
    print(table(outcomes))
    for o in outcomes:
        for line in o.reader_findings + o.rerun_failures + o.mismatches + o.repeat_mismatches:
            print(f"{o.command}: {line}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"settings": vars(args) | {"json_out": str(args.json_out)}, "outcomes": [o.__dict__ for o in outcomes]},
                indent=2,
                default=str,
            )
            + "\n"
        )
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
