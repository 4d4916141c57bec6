"""How the ranks of a worker group are laid out: CFG groups x ring groups x Ulysses groups.

world_size = cfg * ulysses * ring. Global rank r is decomposed as

    r = cfg_rank * (ulysses * ring) + ring_rank * ulysses + ulysses_rank

so the ranks of one Ulysses group are neighbours (on one host they share the fastest links: the
all-to-all is the heaviest collective), the ranks of one sequence-parallel (SP) group of
ulysses * ring ranks are contiguous, and CFG group 0 (ranks 0 .. sp-1) runs the conditional branch
while CFG group 1 runs the unconditional one.

The token sequence is split into `sp` equal shards in SP-rank order (sp_rank = ring_rank * ulysses +
ulysses_rank). A Ulysses all-to-all over one Ulysses group therefore gathers `ulysses` neighbouring
shards: one contiguous ring chunk of L / ring tokens, with num_heads / ulysses heads.
"""
import logging
import math
from dataclasses import dataclass

import torch.distributed as dist

logger = logging.getLogger(__name__)

CFG_DEGREES = (1, 2)


@dataclass(frozen=True)
class ParallelDegrees:
    """cfg: 1 or 2 branch groups; ulysses: all-to-all degree; ring: ring-attention degree."""
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def sequence(self):
        """Ranks that share one sequence (the SP group size)."""
        return self.ulysses * self.ring

    @property
    def world_size(self):
        return self.cfg * self.ulysses * self.ring

    def check(self, world_size):
        """Raise ValueError when these degrees cannot run on `world_size` ranks."""
        for name in ("cfg", "ulysses", "ring"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} degree {value!r} must be a positive integer.")
        if self.cfg not in CFG_DEGREES:
            raise ValueError(f"cfg degree {self.cfg} must be 1 (no CFG parallelism) or 2 (cond and uncond on "
                             "separate rank groups).")
        if self.world_size != world_size:
            raise ValueError(f"cfg x ulysses x ring = {self.cfg} x {self.ulysses} x {self.ring} = {self.world_size}, "
                             f"but the worker group has {world_size} ranks. Choose degrees whose product is "
                             f"{world_size}, or let choose_degrees({world_size}, num_heads, use_cfg) pick them.")

    def __str__(self):
        return f"cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring}"


def choose_degrees(world_size, num_heads, use_cfg):
    """The layout for `world_size` ranks: CFG parallel first (it needs only one small exchange per
    step), then as much Ulysses as the head count allows (the largest degree dividing both the SP
    size and num_heads), and ring attention for the rest.

    choose_degrees(8, 40, True) -> cfg 2 x ulysses 4 x ring 1 (14B);
    choose_degrees(8, 12, False) -> cfg 1 x ulysses 4 x ring 2 (1.3B without guidance);
    choose_degrees(5, 12, True) -> cfg 1 x ulysses 1 x ring 5 (an odd count cannot split CFG).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size {world_size!r} must be a positive integer (the number of worker processes).")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads {num_heads!r} must be a positive integer (the model's attention heads).")
    cfg = 2 if use_cfg and world_size % 2 == 0 else 1
    sequence = world_size // cfg
    ulysses = math.gcd(sequence, num_heads)
    return ParallelDegrees(cfg=cfg, ulysses=ulysses, ring=sequence // ulysses)


class ParallelGroups:
    """This rank's place in the layout and the process groups it talks over.

    Must be built on every rank of the world in the same order (torch.distributed.new_group is a
    collective call). Groups of size 1 are None: nothing to communicate.
    """

    def __init__(self, degrees: ParallelDegrees, rank=None, world_size=None):
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
        degrees.check(world_size)
        self.degrees, self.rank = degrees, rank
        sp, u = degrees.sequence, degrees.ulysses
        self.cfg_rank, self.sp_rank = divmod(rank, sp)
        self.ring_rank, self.ulysses_rank = divmod(self.sp_rank, u)

        rank_of = lambda c, r, q: c * sp + r * u + q
        cfg_ids, ring_ids, uly_ids = range(degrees.cfg), range(degrees.ring), range(u)
        self.sp_ranks = [rank_of(self.cfg_rank, r, q) for r in ring_ids for q in uly_ids]
        self.ring_ranks = [rank_of(self.cfg_rank, r, self.ulysses_rank) for r in ring_ids]
        self.ulysses_ranks = [rank_of(self.cfg_rank, self.ring_rank, q) for q in uly_ids]
        self.cfg_ranks = [rank_of(c, self.ring_rank, self.ulysses_rank) for c in cfg_ids]

        # Every rank creates every group, in one fixed order, as new_group requires.
        self.sp_group = self._new_groups([[rank_of(c, r, q) for r in ring_ids for q in uly_ids] for c in cfg_ids],
                                         self.sp_ranks)
        self.ulysses_group = self._new_groups(
            [[rank_of(c, r, q) for q in uly_ids] for c in cfg_ids for r in ring_ids], self.ulysses_ranks)
        self.ring_group = self._new_groups(
            [[rank_of(c, r, q) for r in ring_ids] for c in cfg_ids for q in uly_ids], self.ring_ranks)
        self.cfg_group = self._new_groups(
            [[rank_of(c, r, q) for c in cfg_ids] for r in ring_ids for q in uly_ids], self.cfg_ranks)

    @staticmethod
    def _new_groups(all_rank_lists, mine):
        if len(mine) == 1:
            return None
        mine_group = None
        for ranks in all_rank_lists:
            group = dist.new_group(ranks)
            if ranks == mine:
                mine_group = group
        return mine_group

    def __repr__(self):
        return (f"ParallelGroups({self.degrees}, rank {self.rank}: cfg_rank {self.cfg_rank}, "
                f"ring_rank {self.ring_rank}, ulysses_rank {self.ulysses_rank})")
