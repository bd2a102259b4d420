"""Batches for the autoencoder's alignment term: every domain in every batch, in equal shares."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import UserError


class DomainBalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices in which every domain holds an equal share (for the alignment statistics).

    An epoch shows every sample of the largest domain once; smaller domains are re-drawn (a fresh
    permutation each pass) to fill their share, so all multi-domain batches are full. Each domain's
    per-epoch permutation is split into ``world_size`` disjoint equal parts (the remainder of fewer
    than ``world_size`` samples sits out that epoch, a different one each epoch) and every rank
    batches only its part, so ranks see disjoint data and the same number of batches: DDP stays in
    step. With one domain this is plain shuffled batching. ``batch_size`` is per rank.
    """

    def __init__(
        self,
        domains: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.domains = np.asarray(domains, dtype=np.int64)
        if self.domains.ndim != 1 or self.domains.size == 0:
            raise UserError("DomainBalancedBatchSampler needs a non-empty list of per-sample domain ids")
        self.domain_ids = np.unique(self.domains)
        if batch_size < len(self.domain_ids):
            raise UserError(
                f"batch size {batch_size} cannot hold all {len(self.domain_ids)} domains; use a batch size of at least that"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in a world of {world_size} processes")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        # Equal shares; the anchor (lowest id) takes the remainder first so its statistics are steadiest.
        base, extra = divmod(batch_size, len(self.domain_ids))
        self.shares = [base + (1 if i < extra else 0) for i in range(len(self.domain_ids))]
        self.members = [np.flatnonzero(self.domains == domain) for domain in self.domain_ids]
        part_sizes = [self._part_size(len(m)) for m in self.members]
        rounding = math.floor if drop_last else math.ceil
        self.num_batches = max(rounding(size / share) for size, share in zip(part_sizes, self.shares))

    def _part_size(self, count: int) -> int:
        # A domain too small to split still appears on every rank, or some ranks' batches would lack it.
        return count // self.world_size if count >= self.world_size else count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _rank_part(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        permuted = members[rng.permutation(len(members))]
        size = self._part_size(len(members))
        if size == len(members):
            return permuted
        return permuted[self.rank * size : (self.rank + 1) * size]

    def __iter__(self) -> Iterator[list[int]]:
        # The split permutation must be identical on every rank; the re-draws need only be rank-local.
        shared_rng = np.random.default_rng([self.seed, self.epoch])
        local_rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        streams = []
        for members, share in zip(self.members, self.shares):
            part = self._rank_part(members, shared_rng)
            needed = self.num_batches * share
            redraws = math.ceil(needed / len(part)) - 1 if len(self.members) > 1 else 0
            passes = [part, *(part[local_rng.permutation(len(part))] for _ in range(redraws))]
            streams.append(np.concatenate(passes)[:needed])
        for batch in range(self.num_batches):
            yield [int(i) for stream, share in zip(streams, self.shares) for i in stream[batch * share : (batch + 1) * share]]
