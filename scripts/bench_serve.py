"""`sift serve` under load: C concurrent clients, batching on against one request at a time.

Loopback only; every run is bounded in seconds and stops by itself. For each mode (one request
at a time, `--batch-size 1`; batched, `--batch-size 16`) a `sift serve` process is started on a
trained workspace and C clients (1, 4, 16) send the builtin questions (routed to their owners'
shards) for `--seconds` each: requests per second, p50 / p99 latency, completion tokens per
second, 429s and failures. Then the batched server runs once more under 16 clients while a
forget of one owner lands mid-way, on a copy of the workspace: the answers from the forgotten
owner's old adapter (or old generation) to requests sent after the certificate was printed
(must be 0), and failed requests (must be 0 apart from 429s, which are counted).

    .venv/bin/python scripts/bench_serve.py                      # builds a builtin workspace first
    .venv/bin/python scripts/bench_serve.py --workspace ws --seconds 20

The clients share the machine with the server (2 CPU cores here), as a loopback client does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SIFT = [sys.executable, "-m", "sift.cli"]


def run(cmd: list[str], **kw: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def build_workspace(root: Path, people: int, shards: int, epochs: int, model: str) -> Path:
    rows = root / "rows.jsonl"
    rows.write_text(run([*SIFT, "builtin-data", "--people", str(people)]))
    ws = root / "ws"
    started = time.perf_counter()
    run(
        [
            *SIFT,
            "-q",
            "train-shards",
            "-w",
            str(ws),
            "--data",
            str(rows),
            "--model",
            model,
            "--num-shards",
            str(shards),
            "--group-by",
            "owner",
            "--epochs",
            str(epochs),
        ]
    )
    run([*SIFT, "-q", "merge", "-w", str(ws), "--method", "mean"])
    print(
        f"built {ws}: {people} people, {shards} shards, {epochs} epochs in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return ws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ws: Path, batch_size: int, max_queue: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                *SIFT,
                "-q",
                "serve",
                "-w",
                str(ws),
                "--port",
                str(self.port),
                "--batch-size",
                str(batch_size),
                "--max-queue",
                str(max_queue),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"sift serve exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    self.health = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("sift serve did not start") from None
                time.sleep(0.5)

    def stop(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            health = json.loads(r.read())
        self.proc.terminate()
        self.proc.wait(30)
        return health


def ask(url: str, prompt: str, max_tokens: int) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"model": "ws", "prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError as e:
        return 0, {"error": str(e)}


def load(
    url: str,
    questions: list[str],
    clients: int,
    seconds: float,
    max_tokens: int,
    stop: threading.Event | None = None,
    switch: tuple[threading.Event, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """`clients` threads asking in turn until `seconds` have passed, or until `stop` is set when
    given (a request under way then finishes and is counted). `switch` (event, questions): once
    the event is set, every other request asks one of these questions."""
    out: list[dict[str, Any]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def running() -> bool:
        return not stop.is_set() if stop is not None else time.monotonic() < end

    def client(c: int) -> None:
        k = c
        while running():
            q = questions[k % len(questions)]
            if switch is not None and switch[0].is_set() and k % 2:
                q = switch[1][k % len(switch[1])]
            k += clients
            sent = time.monotonic()
            status, body = ask(url, q, max_tokens)
            rec = {"sent": sent, "done": time.monotonic(), "status": status, "prompt": q, "body": body}
            with lock:
                out.append(rec)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summary(recs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    ok = [r for r in recs if r["status"] == 200]
    lat = sorted(r["done"] - r["sent"] for r in ok)
    span = max((r["done"] for r in recs), default=0) - min((r["sent"] for r in recs), default=0)
    span = max(span, seconds)
    tokens = sum(r["body"]["usage"]["completion_tokens"] for r in ok)
    return {
        "requests": len(ok),
        "rps": len(ok) / span,
        "p50": statistics.median(lat) if lat else float("nan"),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "tokens_per_s": tokens / span,
        "429": sum(r["status"] == 429 for r in recs),
        "failed": sum(r["status"] not in (200, 429) for r in recs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, help="a trained workspace (default: build one on the builtin model)")
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sift-bench-serve-"))
    try:
        ws = args.workspace or build_workspace(tmp, args.people, args.shards, args.epochs, args.model)
        out = run([*SIFT, "builtin-data", "--people", str(args.people)])
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        questions = [r["prompt"] for r in rows]
        clients = [int(c) for c in args.clients.split(",") if c]
        results: list[dict[str, Any]] = []
        for mode, batch in (("one at a time", 1), ("batched", args.batch_size)):
            server = Server(ws, batch, max_queue=64)
            print(f"{mode}: batching {server.health['batching']}", file=sys.stderr, flush=True)
            for c in clients:
                recs = load(server.url, questions, c, args.seconds, args.max_tokens)
                row = {"mode": mode, "clients": c, **summary(recs, args.seconds)}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            row_health = server.stop()
            results[-1]["health"] = row_health["batching"]
        forget = forget_under_load(ws, tmp, rows, questions, args)
        report(results, forget, args)
        if args.json:
            args.json.write_text(json.dumps({"load": results, "forget": forget}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def forget_under_load(
    ws: Path, tmp: Path, rows: list[dict[str, Any]], questions: list[str], args: Any
) -> dict[str, Any]:
    """16 clients on the batched server; one owner forgotten a third of the way in."""
    copy = tmp / "copy" / "ws"  # the folder's name is the served model's id
    shutil.copytree(ws, copy)
    owner = rows[0]["owner"]
    ids = [r["id"] for r in rows if r["owner"] == owner]
    owner_questions = {r["prompt"] for r in rows if r["owner"] == owner}
    server = Server(copy, args.batch_size, max_queue=64)
    old_gen = server.health["generation"]
    before = ask(server.url, rows[0]["prompt"], 4)[1]
    old_adapter = before["sift"]["adapter_sha256"]
    cert: dict[str, Any] = {}
    stop, certified = threading.Event(), threading.Event()

    def do_forget() -> None:
        try:
            time.sleep(args.seconds / 3)
            started = time.monotonic()
            out = run([*SIFT, "-q", "forget", "-w", str(copy), "--ids", "-", "--json"], input="\n".join(ids))
            cert.update(json.loads(out), printed=time.monotonic(), took=time.monotonic() - started)
            certified.set()  # from now on, half the requests ask the forgotten owner's questions
            time.sleep(args.seconds * 2 / 3)  # the load goes on as long again after the certificate
        finally:
            stop.set()

    forgetter = threading.Thread(target=do_forget)
    forgetter.start()
    recs = load(
        server.url, questions, 16, args.seconds, args.max_tokens, stop=stop, switch=(certified, sorted(owner_questions))
    )
    forgetter.join()
    server.stop()
    after = [r for r in recs if r["sent"] > cert["printed"]]
    bad = [
        r
        for r in after
        if r["status"] == 200
        and (
            r["body"]["sift"]["generation"] == old_gen
            or (old_adapter is not None and r["body"]["sift"]["adapter_sha256"] == old_adapter)
        )
    ]
    return {
        "owner": owner,
        "rows_forgotten": len(ids),
        "forget_seconds": round(cert["took"], 1),
        **summary(recs, args.seconds),
        "sent_after_certificate": len(after),
        "owner_questions_after": sum(r["prompt"] in owner_questions for r in after),
        "answered_from_forgotten_after_certificate": len(bad),
    }


def report(results: list[dict[str, Any]], forget: dict[str, Any], args: Any) -> None:
    alone = {r["clients"]: r for r in results if r["mode"] == "one at a time"}
    print(
        f"\nloopback, {args.seconds:g} s per row, {args.max_tokens} new tokens at most, "
        f"{os.cpu_count()} CPU cores, clients on the same machine\n"
    )
    print("| mode | clients | requests | req/s | vs one at a time | p50 s | p99 s | tokens/s | 429 | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["rps"] / alone[r["clients"]]["rps"] if alone.get(r["clients"], {}).get("rps") else float("nan")
        print(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['rps']:.2f} | {ratio:.2f}x | {r['p50']:.2f} | "
            f"{r['p99']:.2f} | {r['tokens_per_s']:.1f} | {r['429']} | {r['failed']} |"
        )
    f = forget
    print(
        f"\nforget of {f['owner']} ({f['rows_forgotten']} rows, {f['forget_seconds']} s) under 16 clients, batched: "
        f"{f['requests']} answered, {f['sent_after_certificate']} sent after the certificate "
        f"({f['owner_questions_after']} of them the owner's questions), "
        f"{f['answered_from_forgotten_after_certificate']} answered from the forgotten owner's old adapter or generation, "
        f"{f['failed']} failed, {f['429']} got 429"
    )


if __name__ == "__main__":
    main()
