"""Several trainers on one workspace: which shards a command names (`--shards 0-3,7`), which
rank of a launch this process is, and each rank's part of the shards (a split every rank
computes alike from the rows alone, with no messages)."""

from __future__ import annotations

import os

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
    """(rank, world size) as `accelerate launch` and torchrun set them (RANK, WORLD_SIZE);
    (0, 1) for a plain process."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise SiftError("RANK and WORLD_SIZE must be integers (they are set by accelerate launch / torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise SiftError(f"RANK {rank} does not fit WORLD_SIZE {world}")
    return rank, world


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
