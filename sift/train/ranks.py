"""Several trainers on one workspace: which shards a command names (`--shards 0-3,7`), which
rank of a launch this process is, and the order in which a worker claims shards.

Workers steal work instead of keeping a fixed split: each walks its own share first (a split
every rank computes alike from the rows alone, with no messages), then everyone else's, and
claims a shard with a non-blocking lock. A shard another worker holds is passed over and
visited again until it is done; a killed worker's lock dies with it, so the next visit takes
its shard. A rank that starts late or runs slow therefore costs no more than its own shards."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from sift.errors import SiftError
from sift.workspace.view import WorkspaceView


def parse_shard_spec(spec: str | None, num_shards: int) -> list[int]:
    """`0-3,7` -> [0, 1, 2, 3, 7]; None -> every shard."""
    if spec is None:
        return list(range(num_shards))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise SiftError(f"bad shard list {spec!r}: use e.g. 0-3,7") from None
    bad = sorted(s for s in out if not 0 <= s < num_shards)
    if bad:
        raise SiftError(f"shard {bad[0]} is out of range: this workspace has shards 0-{num_shards - 1}")
    return sorted(out)


def launch_rank() -> tuple[int, int]:
    """(rank, world size) of this process: RANK / WORLD_SIZE as torchrun and `accelerate launch`
    set them; else, inside an `srun` step, SLURM_PROCID / SLURM_STEP_NUM_TASKS (a batch script
    itself is not a task of a step, even with --ntasks); (0, 1) for a plain process."""
    env = os.environ
    if "WORLD_SIZE" in env or "RANK" in env:
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    else:
        return 0, 1
    try:
        rank, world = int(env.get(names[0], "0")), int(env.get(names[1], "1"))
    except ValueError:
        raise SiftError(f"{names[0]} and {names[1]} must be integers (the launcher sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise SiftError(f"{names[0]} {rank} does not fit {names[1]} {world}")
    return rank, world


def launch_id() -> str:
    """What names this launch alike on every rank: torchrun's run id (`accelerate launch` runs
    torchrun), Slurm's job and step, and the rendezvous address; '' for a plain process."""
    names = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT")
    return "|".join(os.environ.get(n, "") for n in names) if any(n in os.environ for n in names) else ""


def rank_shards(view: WorkspaceView, shards: list[int], rank: int, world: int) -> list[int]:
    """This rank's part of `shards`: most rows first to the least-loaded rank (ties to the lower
    rank). Every rank computes the same split with no messages, from the rows alone: whether a
    shard is already trained changes while other ranks work, so it must not steer the split."""
    cost = {s: len(view.rows.get(s, [])) for s in shards}
    load, mine = [0] * world, {r: [] for r in range(world)}
    for s in sorted(shards, key=lambda s: (-cost[s], s)):
        r = min(range(world), key=lambda i: (load[i], i))
        mine[r].append(s)
        load[r] += cost[s]
    return sorted(mine[rank])


def claim_order(view: WorkspaceView, shards: list[int], rank: int, world: int) -> list[int]:
    """The order rank `rank` visits `shards` in: its own share (rank_shards), then the others'
    shares, each most rows first (the longest jobs start early, so the last to finish is short)."""
    cost = {s: len(view.rows.get(s, [])) for s in shards}
    mine = set(rank_shards(view, shards, rank, world))
    return sorted(shards, key=lambda s: (s not in mine, -cost[s], s))


def steal_walk(
    order: list[int],
    claim: Callable[[int], contextlib.AbstractContextManager[bool]],
    work: Callable[[int], None],
    poll: float = 0.5,
) -> None:
    """Visit every shard of `order` until each has been worked under its claim: `claim(s)` yields
    True when this worker holds shard s (then `work(s)` runs, which finds a shard another worker
    finished already current and leaves it), False when another worker holds it (visited again
    on the next pass, after `poll` seconds when a whole pass found nothing free). Returns once
    no shard is left: every shard was done here or found done under its own lock."""
    pending = list(order)
    while pending:
        held_elsewhere = []
        for shard in pending:
            with claim(shard) as held:
                if held:
                    work(shard)
                else:
                    held_elsewhere.append(shard)
        if len(held_elsewhere) == len(pending):
            time.sleep(poll)
        pending = held_elsewhere
