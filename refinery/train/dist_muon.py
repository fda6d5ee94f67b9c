"""Distributed Muon: every matrix orthogonalized whole, once, by one owner rank.

Newton-Schulz needs the whole matrix: orthogonalizing each rank's shard alone gives a
different (wrong) update, and running it on every rank wastes world_size x the compute.
`DistMuon` keeps `Muon`'s math and replaces only `_orthogonalize`:

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

from refinery.train.muon import Muon, newton_schulz


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


class DistMuon(Muon):
    """Muon over a process group: same update as `Muon` on one process, NS run once per matrix."""

    def __init__(self, params, group=None, **kwargs):
        super().__init__(params, **kwargs)
        self.group = group
        self.ns_calls = 0
        """Newton-Schulz runs on this rank (each matrix counted on its owner only)."""

    def _orthogonalize(self, updates: list[Tensor], group: dict) -> list[Tensor]:
        if not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            self.ns_calls += len(updates)
            return super()._orthogonalize(updates, group)
        from torch.distributed.tensor import DTensor

        sharded = [isinstance(u, DTensor) for u in updates]
        if all(sharded):
            return self._sharded(updates, group["ns_steps"])
        if any(sharded):
            raise TypeError("DistMuon: a param group mixes DTensor (sharded) and plain (replicated) params; "
                            "shard the whole model with fully_shard or none of it")
        return self._replicated(updates, group["ns_steps"])

    def _replicated(self, updates: list[Tensor], steps: int) -> list[Tensor]:
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        owners = assign_owners([tuple(u.shape) for u in updates], world)
        mine = [newton_schulz(u, steps) for u, o in zip(updates, owners) if o == me]
        self.ns_calls += len(mine)
        got = _exchange([mine] * world, world, self.group)
        out: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
        cursor = [0] * world
        for i, o in enumerate(owners):
            if o == me:
                continue
            n = updates[i].numel()
            out[i] = got[o][cursor[o]:cursor[o] + n].view(updates[i].shape)
            cursor[o] += n
        for i, res in zip([i for i, o in enumerate(owners) if o == me], mine):
            out[i] = res.float()
        return out

    def _sharded(self, updates: list[Tensor], steps: int) -> list[Tensor]:
        from torch.distributed.tensor import DTensor, Shard

        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        for u in updates:
            if u.device_mesh.ndim != 1 or tuple(u.placements) != (Shard(0),):
                raise NotImplementedError(f"DistMuon: sharded params must be Shard(0) on a 1-D mesh (as "
                                          f"fully_shard makes them), got {u.placements} on a "
                                          f"{u.device_mesh.ndim}-D mesh")
        shapes = [tuple(u.shape) for u in updates]
        owners = assign_owners(shapes, world)
        # 1. every rank's row shard of matrix i -> owner(i)
        send = [[u.to_local() for u, o in zip(updates, owners) if o == k] for k in range(world)]
        got = _exchange(send, world, self.group)
        # 2. the owner reassembles its matrices (rank order = row order), orthogonalizes, splits by rows
        back: list[list[Tensor]] = [[] for _ in range(world)]
        cursor = [0] * world
        for i, o in enumerate(owners):
            if o != me:
                continue
            rows, cols = shapes[i]
            splits = row_splits(rows, world)
            parts = []
            for k in range(world):
                n = splits[k] * cols
                parts.append(got[k][cursor[k]:cursor[k] + n].view(splits[k], cols))
                cursor[k] += n
            full = newton_schulz(torch.cat(parts), steps).float()
            self.ns_calls += 1
            for k, piece in enumerate(full.split(splits)):
                back[k].append(piece)
        # 3. each rank gets its rows of every result back from the owners
        got = _exchange(back, world, self.group)
        out = []
        cursor = [0] * world
        for u, o, (rows, cols) in zip(updates, owners, shapes):
            n = row_splits(rows, world)[me] * cols
            local = got[o][cursor[o]:cursor[o] + n].view(-1, cols)
            cursor[o] += n
            out.append(DTensor.from_local(local, u.device_mesh, u.placements, shape=u.shape, stride=u.stride()))
        return out
