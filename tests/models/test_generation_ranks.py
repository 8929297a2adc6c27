"""Generation's stop decision with sharded weights: every rank's (a rank stopping alone would
leave the others in their next forward, a collective under FSDP2 / ZeRO-3)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmlab.models.generation import all_rows_done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        done = torch.tensor([True, rank == 0])  # rank 0's rows are all done, rank 1's are not
        results[rank] = (all_rows_done(done, sharded=True), all_rows_done(done, sharded=False))
    finally:
        dist.destroy_process_group()


def test_sharded_generation_stops_only_when_every_rank_is_done():
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
    assert results[0][0] is False and results[1][0] is False  # agreed: go on
    assert (results[0][1], results[1][1]) == (True, False)     # unsharded: each its own rows


def test_single_process_reads_its_own_rows():
    assert all_rows_done(torch.tensor([True, True]), sharded=True)
    assert not all_rows_done(torch.tensor([True, False]), sharded=True)
