"""Data-parallel training (DDP, two CPU processes over gloo) with the compiled module wrapped by DDP."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, results) -> None:
    import sparse_compiler
    from sparse_compiler import state
    from sparse_compiler.layouts import get_layout

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        options = {"density": 0.25, "block_size": 16, "rescale_init": False}
        ddp = nn.parallel.DistributedDataParallel(torch.compile(model, backend="sparsify", options=options))
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(3):
            loss = ddp(torch.randn(16, 64, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sparse = [p for p in model.parameters() if state.layout_of(p) is not None]
        dropped_zero = all(
            torch.count_nonzero(p[~get_layout(state.layout_of(p)[0]).element_mask()]) == 0 for p in sparse
        )
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        results[rank] = (
            len(sparse),
            dropped_zero,
            all(torch.equal(gathered[0], g) for g in gathered),
            sparse_compiler.last_report().n_sparse,
        )
    finally:
        dist.destroy_process_group()


def test_ddp_of_the_compiled_module_trains_the_same_sparse_model_on_every_rank():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_train, args=(world, _free_port(), results), nprocs=world)
        results = dict(results)
    for rank in range(world):
        n_sparse, dropped_zero, ranks_agree, reported = results[rank]
        assert n_sparse == 2 and reported == 2, rank
        assert dropped_zero, f"rank {rank}: dropped blocks moved"
        assert ranks_agree, f"rank {rank}: replicas diverged"
