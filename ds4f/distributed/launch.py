"""⑦ TP launch: an EngineConfig with tensor_parallel_size > 1 in, rank 0's TPExecutor (workers running) out.

One node: rank 0 (this process) hosts the store on an ephemeral loopback port and spawns ranks 1..N-1. Several
nodes: node 0 hosts it on --master-addr:--master-port and spawns its local ranks; every other node runs
`run_headless` (its own ranks, no HTTP). Each rank loads the model itself, shards it, and builds an identical
runner (KV cache sized by the smallest budget over the ranks, since every rank holds the full KV cache).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import pickle
import time
from typing import Any

import torch

from ds4f.distributed.comm import Comm
from ds4f.distributed.executor import TPExecutor, Watchdog
from ds4f.distributed.parallel import ParallelConfig
from ds4f.distributed.rendezvous import agree_env, head_store, join, log, make_groups, wait_key
from ds4f.distributed.symm import try_symm
from ds4f.distributed.worker import spawn_local


def _agree_min(ctrl: Any, value: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    ctrl.allreduce([t], opts).wait()
    return int(t.item())


def build_rank(config: Any, pc: ParallelConfig, rank: int, store: Any,
               sampler: Any = None) -> tuple[Any, Any, Any, int]:
    """Groups, sharded model and runner of one rank -> (runner, control group, model args, max_model_len).
    Loads and warms up as a single-GPU build_runner does: the runner rule is choose_runner's (auto = reference under
    TP, --runner fast opts in), the fast path loads packed-only, and the one warmup is that runner's own, so its
    activation peak is what the budget leaves room for; then the ranks agree on the smallest budget."""
    from ds4f.config import DEFAULT_CPU_KV_CACHE_MEMORY
    from ds4f.model.loader import load_model
    from ds4f.runner.memory_plan import graph_reserve
    from ds4f.runner.model_runner import build_runner, kv_cache_budget, prepare, use_fast

    device = config.resolved_device
    local = rank - pc.node_ranks[0]
    if device == "cuda":
        torch.cuda.set_device(local)
    elif rank != 0 or pc.ranks_per_node > 1:  # CPU ranks share the cores of one machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // pc.ranks_per_node))
    agree_env(store, rank, pc.world_size, timeout=pc.join_timeout)  # before any collective a switch picks
    ctrl, model_pg = make_groups(store, pc, rank, device)
    dtype = getattr(torch, config.resolved_dtype)
    fast_ar = try_symm(ctrl, store, rank, pc.world_size, torch.device(device, local) if device == "cuda"
                       else torch.device(device), not pc.multi_node, _agree_min, backend=model_pg)
    # each rank reads (or, for dummy weights, generates and keeps) only its own slice of every tensor
    model = load_model(config.model, dtype=dtype, device=device, load_format=config.load_format, seed=config.seed,
                       tp_rank=rank, tp_world=pc.world_size, comm=Comm(rank, pc.world_size, model_pg, fast_ar),
                       keep_dequantized=not use_fast(config))
    prepared = prepare(config, model)  # every rank warms up together (the forward's all-reduces pair up)
    budget = kv_cache_budget(torch.device(device), config.gpu_memory_utilization, config.kv_cache_memory,
                             DEFAULT_CPU_KV_CACHE_MEMORY, graph_reserve(config, model, torch.device(device)))
    config = dataclasses.replace(config, kv_cache_memory=max(1, _agree_min(ctrl, budget)))
    runner, args, max_model_len = build_runner(config, sampler=sampler, prepared=prepared)
    return runner, ctrl, args, max_model_len


def launch_tp(config: Any, pc: ParallelConfig | None = None, model: Any = None,
              sampler: Any = None) -> tuple[TPExecutor, Any, int]:
    """Rank 0: start (or wait for) every rank, build its own shard -> (executor, model args, max_model_len)."""
    pc = pc or ParallelConfig.from_engine_config(config)
    if model is not None:
        raise ValueError("--tensor-parallel-size > 1: every rank loads the model itself; pass a model name or "
                         "directory, not a model object")
    if pc.node_rank != 0:
        raise ValueError(f"--node-rank {pc.node_rank}: only node 0 serves; start the other nodes with --headless")
    from ds4f.model.hub import resolve_model
    from ds4f.model.tp import check_shardable

    check_shardable(resolve_model(config.model).args, pc.world_size)  # before starting any rank
    store = head_store(pc)
    port = store.port
    children = spawn_local(pc, list(pc.node_ranks)[1:], "127.0.0.1", port)
    watchdog = Watchdog(0, pc, store, children)
    addr = f"{pc.master_addr}" if pc.multi_node else "127.0.0.1"
    log(f"rank 0: tensor parallel over {pc.world_size} ranks on {pc.nnodes} node(s); store at {addr}:{port}")
    def dead() -> list[str]:
        return [d for c in children if (d := c.dead()) is not None]

    try:
        join(store, pc, 0, addr, port, dead)
        store.set("config", pickle.dumps(config))
        runner, ctrl, args, max_model_len = build_rank(config, pc, 0, store, sampler)
        deadline = time.monotonic() + pc.join_timeout
        for r in range(1, pc.world_size):
            wait_key(store, f"ready/{r}", max(0.0, deadline - time.monotonic()),
                     f"rank 0: rank {r} did not finish loading the model", dead)
        store.set("go", "1")
    except BaseException:
        for c in children:
            c.kill()
        raise
    executor = TPExecutor(runner, ctrl, watchdog)
    executor.store = store  # the store server lives in this process; keep it as long as the executor
    atexit.register(executor.close)
    return executor, args, max_model_len
