"""Distributed Muon: every matrix orthogonalized whole, once, by one owner rank.

Newton-Schulz needs the whole matrix: orthogonalizing each rank's shard alone gives a
different (wrong) update, and running it on every rank wastes world_size x the compute.
`DistMuon` keeps `Muon`'s step (momentum, weight decay, the update, with foreach kernels on
each rank's local shards) and replaces only `_orthogonalize` and `_view` (the local shard):

- each matrix gets an owner rank (greedy by Newton-Schulz FLOPs, the same on every rank);
- replicated params (ddp, or one process): the owner orthogonalizes its matrices, and one
  `all_to_all` sends each result to every rank;
- sharded params (FSDP2 DTensor, Shard(0) over one mesh dim): one `all_to_all` sends every
  rank's row shard to the owner, the owner concatenates and orthogonalizes, and a second
  `all_to_all` returns each rank its rows of the result.

Two collectives per step for all matrices together (not two per matrix): the traffic is one
copy of the updates, where `torch.optim.Muon` on DTensor gathers implicitly inside each matmul.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from torch.distributed.tensor import Shard

from refinery.train.muon import Muon, orthogonalize


def _ns_flops(shape: tuple[int, ...]) -> int:
    small, big = sorted(shape[:2])
    return small * small * (small + big)


def assign_owners(shapes: list[tuple[int, ...]], world: int) -> list[int]:
    """Owner rank per matrix: biggest first onto the least-loaded rank (deterministic)."""
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-_ns_flops(shapes[i]), i)):
        r = min(range(world), key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += _ns_flops(shapes[i])
    return owners


def row_splits(rows: int, world: int) -> list[int]:
    """Rows per rank of a Shard(0) DTensor (torch.chunk sizes, trailing ranks may get 0)."""
    size = -(-rows // world)
    return [max(0, min(size, rows - k * size)) for k in range(world)]


def _exchange(send: list[list[Tensor]], world: int, group) -> list[Tensor]:
    """all_to_all of flat fp32 buffers: send[k] goes to rank k; returns what each rank sent here."""
    flat = [torch.cat([t.reshape(-1).float() for t in parts]) if parts else torch.empty(0) for parts in send]
    in_splits = [f.numel() for f in flat]
    out_splits = torch.tensor(in_splits, dtype=torch.int64)
    counts = torch.empty(world * world, dtype=torch.int64)
    dist.all_gather_single(counts, out_splits, group=group)
    me = dist.get_rank(group)
    recv_splits = counts.view(world, world)[:, me].tolist()
    out = torch.empty(sum(recv_splits), dtype=torch.float32)
    dist.all_to_all_single(out, torch.cat(flat), recv_splits, in_splits, group=group)
    return list(out.split(recv_splits))


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place ops update the DTensor), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


class DistMuon(Muon):
    """Muon over a process group: same update as `Muon` on one process, NS run once per matrix.

    The element-wise parts (momentum, weight decay, the step) run on each rank's local shards
    with foreach kernels (no DTensor dispatch, no communication); only Newton-Schulz moves data.
    """

    def __init__(self, params, group=None, **kwargs):
        super().__init__(params, **kwargs)
        self.group = group
        self.ns_calls = 0
        """Matrices orthogonalized on this rank (each matrix counted on its owner only)."""

    def _view(self, t: Tensor) -> Tensor:
        return _local(t)

    def _orthogonalize(self, updates: list[Tensor], params: list[Tensor], group: dict) -> list[Tensor]:
        from torch.distributed.tensor import DTensor

        sharded = [isinstance(p, DTensor) for p in params]
        if any(sharded) and not all(sharded):
            raise TypeError("DistMuon: a param group mixes DTensor (sharded) and plain (replicated) params; "
                            "shard the whole model with fully_shard or none of it")
        shapes = [tuple(p.shape) for p in params]
        if not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            self.ns_calls += len(updates)
            return orthogonalize(updates, group["ns_steps"])
        if all(sharded):
            for p in params:
                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                    raise NotImplementedError(f"DistMuon: sharded params must be Shard(0) on a 1-D mesh (as "
                                              f"fully_shard makes them), got {p.placements}")
            return self._sharded(updates, shapes, group["ns_steps"])
        return self._replicated(updates, shapes, group["ns_steps"])

    def _owned(self, mats: list[Tensor], steps: int) -> list[Tensor]:
        self.ns_calls += len(mats)
        return [m.float() for m in orthogonalize(mats, steps)]

    def _replicated(self, updates: list[Tensor], shapes: list[tuple], steps: int) -> list[Tensor]:
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        owners = assign_owners(shapes, world)
        mine_idx = [i for i, o in enumerate(owners) if o == me]
        mine = self._owned([updates[i] for i in mine_idx], steps)
        got = _exchange([mine] * world, world, self.group)
        out: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
        cursor = [0] * world
        for i, o in enumerate(owners):
            if o != me:
                n = updates[i].numel()
                out[i] = got[o][cursor[o]:cursor[o] + n].view(shapes[i])
                cursor[o] += n
        for i, res in zip(mine_idx, mine):
            out[i] = res
        return out

    def _sharded(self, updates: list[Tensor], shapes: list[tuple], steps: int) -> list[Tensor]:
        """updates: this rank's row shards; returns this rank's rows of each orthogonalized matrix."""
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        owners = assign_owners(shapes, world)
        # 1. every rank's row shard of matrix i -> owner(i)
        got = _exchange([[u for u, o in zip(updates, owners) if o == k] for k in range(world)], world, self.group)
        # 2. the owner reassembles its matrices (rank order = row order), orthogonalizes them
        mine_idx = [i for i, o in enumerate(owners) if o == me]
        full = []
        cursor = [0] * world
        for i in mine_idx:
            rows, cols = shapes[i]
            parts = []
            for k, n_rows in enumerate(row_splits(rows, world)):
                parts.append(got[k][cursor[k]:cursor[k] + n_rows * cols].view(n_rows, cols))
                cursor[k] += n_rows * cols
            full.append(torch.cat(parts))
        # 3. ... and sends each rank its rows of every result
        back: list[list[Tensor]] = [[] for _ in range(world)]
        for i, res in zip(mine_idx, self._owned(full, steps)):
            for k, piece in enumerate(res.split(row_splits(shapes[i][0], world))):
                back[k].append(piece)
        got = _exchange(back, world, self.group)
        out = []
        cursor = [0] * world
        for o, (rows, cols) in zip(owners, shapes):
            n = row_splits(rows, world)[me] * cols
            out.append(got[o][cursor[o]:cursor[o] + n].view(-1, cols))
            cursor[o] += n
        return out
