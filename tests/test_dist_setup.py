"""Multi-process set-up: NCCL gets its device before the group exists, and a stuck rank is an
error that names the rank and the stage, not a hang."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gift_quant.train import distributed
from gift_quant.train.distributed import CollectiveTimeout


def test_nccl_group_is_bound_to_its_device(monkeypatch):
    """init() sets the CUDA device and passes device_id to init_process_group, so NCCL never
    guesses the device from the rank (no GPU needed: the torch calls are recorded)."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw))
    )
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or "g")
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    d = distributed.init(torch.device("cuda"), timeout_s=123)
    assert calls[0] == ("set_device", 1)
    name, backend, kw = calls[1]
    assert (name, backend) == ("init", "nccl")
    assert kw["device_id"] == torch.device("cuda", 1)
    assert kw["timeout"].total_seconds() == 123
    assert calls[2][0] == "new_group" and calls[2][1]["backend"] == "gloo"
    assert (d.rank, d.world, d.local_rank, d.cpu_group, d.timeout) == (1, 2, 1, "g", 123)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but only 2 CUDA devices"):
        distributed.init(torch.device("cuda"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank)
    )
    os.environ["LOCAL_RANK"] = str(rank)
    d = distributed.init(torch.device("cpu"), timeout_s=3)
    d.stage = "quantize"
    if rank == 1:
        time.sleep(8)  # stuck in its stage far past the timeout
        results.put((rank, "late"))
        return
    try:
        d.barrier()
        results.put((rank, "passed"))
    except CollectiveTimeout as exc:
        results.put((rank, str(exc)))


def test_a_stuck_rank_is_an_error_naming_rank_and_stage():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in (0, 1)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    message = got[0]
    assert message.startswith("rank 0/2: stage 'quantize': "), message
    assert "train.dist_timeout_s=3s" in message
    assert time.perf_counter() - t0 < 100
