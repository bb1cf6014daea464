"""⑦ distributed layout: TP / node flags in, a validated ParallelConfig (which ranks run where, timeouts) out."""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass
from typing import Any

SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0  # node 0 runs rank 0: the scheduler and the HTTP server
    master_addr: str = "127.0.0.1"  # node 0's address as the other nodes reach it (TCPStore host)
    master_port: int = 29501  # TCPStore port on node 0 (one node: an ephemeral port is picked instead)
    distributed_timeout: float = 60.0  # s a collective (or a silent peer) may take before every rank exits
    join_timeout: float = 600.0  # s to wait for every rank to join the rendezvous and load the model

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        tp, n = self.tensor_parallel_size, self.nnodes
        need(tp >= 1, f"--tensor-parallel-size: must be >= 1, got {tp}")
        need(n >= 1, f"--nnodes: must be >= 1, got {n}")
        need(tp % n == 0, f"--tensor-parallel-size {tp} does not split over --nnodes {n}: every node runs the same "
                          f"number of ranks (one per GPU); use a multiple of {n}")
        need(0 <= self.node_rank < n, f"--node-rank: must be in [0, {n}) for --nnodes {n}, got {self.node_rank}")
        need(0 < self.master_port < 65536, f"--master-port: must be in 1..65535, got {self.master_port}")
        need(bool(self.master_addr), "--master-addr: give node 0's address, e.g. --master-addr 10.0.0.1")
        need(self.distributed_timeout > 0, f"--distributed-timeout: must be > 0 s, got {self.distributed_timeout}")
        need(self.join_timeout > 0, f"--join-timeout: must be > 0 s, got {self.join_timeout}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def node_ranks(self) -> range:
        """Global ranks this node runs; local index i = rank - first = its CUDA device."""
        k = self.ranks_per_node
        return range(self.node_rank * k, (self.node_rank + 1) * k)

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @classmethod
    def from_engine_config(cls, config: Any) -> ParallelConfig:
        """The parallel fields of an EngineConfig (fields it lacks keep their defaults)."""
        names = ("tensor_parallel_size", "nnodes", "node_rank", "master_addr", "master_port", "distributed_timeout",
                 "join_timeout")
        return cls(**{n: getattr(config, n) for n in names if getattr(config, n, None) is not None})


def local_ip_towards(addr: str, port: int = 9) -> str:
    """The local address the kernel would use to reach addr (a UDP connect: routes, sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, port))
        return str(s.getsockname()[0])


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each interface that has one: {name: address}."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            out[name] = socket.inet_ntoa(raw[20:24])
    return out


def interface_for(ip: str) -> str | None:
    """Name of the interface holding ip, if any."""
    return next((name for name, a in interface_addresses().items() if a == ip), None)


def describe_exit(code: int | None) -> str:
    """A process exit code as words: 'code 3', 'signal SIGKILL', 'still running'."""
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
