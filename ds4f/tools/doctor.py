"""Doctor stage: the launch flags + this machine in, one line per check (with the fix for a problem) out.

Checks what broke the seed's users: locked-memory limit, /dev/shm, NCCL/GLOO_SOCKET_IFNAME, RDMA devices, the head's
address, GPU count and free memory against the weights per rank. Every probe of the machine goes through `Host`, so
tests inject the environment instead of needing it; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds4f.distributed.parallel import ParallelConfig, interface_addresses

GiB = 1 << 30
MEMLOCK_MIN = 64 * GiB  # NCCL pins its buffers (and with GPUDirect RDMA, registers GPU memory): ask for unlimited
SHM_MIN = 1 * GiB  # NCCL's shared-memory transport; Docker's default is 64 MiB
CONNECT_TIMEOUT_S = 2.0
LEVELS = ("ok", "skip", "warn", "fail")


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # one of LEVELS
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level.upper():4} {self.check}: {self.detail}"
        return text + (f"\n     fix: {self.fix}" if self.fix else "")


def _memlock() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def _shm_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_frsize * st.f_blocks


def _interfaces() -> dict[str, str | None]:
    addrs = interface_addresses()
    return {name: addrs.get(name) for _, name in socket.if_nameindex()}


def _rdma_devices() -> list[str]:
    d = Path("/sys/class/infiniband")
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _gpus() -> list[tuple[int, int]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [tuple(torch.cuda.mem_get_info(i)) for i in range(torch.cuda.device_count())]  # type: ignore[misc]
    except Exception:  # a broken driver counts as no GPU; the GPU check says so
        return []


def _host_mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _connect(addr: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens; else 'refused' or the error text."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return str(e) or type(e).__name__


def _port_free(port: int) -> str | None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            return "in use" if e.errno == errno.EADDRINUSE else str(e)
    return None


@dataclass
class Host:
    """What doctor reads of the machine."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    memlock: Callable[[], int] = _memlock  # soft RLIMIT_MEMLOCK in bytes, -1 = unlimited
    shm_bytes: Callable[[], int | None] = _shm_bytes
    interfaces: Callable[[], dict[str, str | None]] = _interfaces  # name -> IPv4 (None: no address)
    rdma_devices: Callable[[], list[str]] = _rdma_devices
    gpus: Callable[[], list[tuple[int, int]]] = _gpus  # (free, total) bytes per visible GPU
    host_mem_available: Callable[[], int | None] = _host_mem_available
    connect: Callable[[str, int, float], str | None] = _connect
    port_free: Callable[[int], str | None] = _port_free


def _fmt(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


def _uses_gpu(device: str, host: Host) -> bool:
    return device == "cuda" or (device == "auto" and bool(host.gpus()))


def _uses_ib(host: Host) -> bool:
    return host.env.get("NCCL_NET", "").lower() == "ib"


def check_memlock(pc: ParallelConfig, device: str, host: Host) -> Finding:
    name = "locked memory (ulimit -l)"
    if pc.world_size == 1 or not _uses_gpu(device, host):
        return Finding(name, "skip", "only NCCL (GPU tensor parallel) pins memory")
    lim = host.memlock()
    if lim < 0 or lim >= MEMLOCK_MIN:
        return Finding(name, "ok", "unlimited" if lim < 0 else _fmt(lim))
    level = "fail" if _uses_ib(host) or host.rdma_devices() else "warn"  # NCCL picks IB whenever a device exists
    return Finding(name, level, f"{_fmt(lim)}: NCCL cannot register its buffers with the NIC and stops with "
                                f"`NCCL WARN Call to ibv_reg_mr failed: Cannot allocate memory`",
                   "`ulimit -l unlimited` before starting (or `* - memlock unlimited` in /etc/security/limits.conf, "
                   "then log in again); in Docker `--ulimit memlock=-1:-1` (deploy/compose.yaml sets it)")


def check_shm(pc: ParallelConfig, device: str, host: Host) -> Finding:
    name = "/dev/shm"
    if pc.world_size == 1 or not _uses_gpu(device, host):
        return Finding(name, "skip", "only NCCL's shared-memory transport uses it")
    size = host.shm_bytes()
    if size is None:
        return Finding(name, "fail", "no /dev/shm: NCCL fails with `unhandled system error` creating its segments",
                       "mount a tmpfs on /dev/shm (`mount -t tmpfs -o size=32G tmpfs /dev/shm`)")
    if size >= SHM_MIN:
        return Finding(name, "ok", _fmt(size))
    return Finding(name, "fail", f"{_fmt(size)}: NCCL runs out of it (`NCCL WARN Error while creating shared memory "
                                 f"segment ... (size N)`, then `unhandled system error`)",
                   "Docker: `--shm-size 32g` (or `--ipc host`); on a host: `mount -o remount,size=32G /dev/shm`")


def _nccl_matches(spec: str, names: list[str]) -> list[str]:
    """Names of NCCL_SOCKET_IFNAME that match no interface: a comma list of prefixes, `=` for exact names
    (`^` = exclude these: nothing has to exist, so the caller does not ask)."""
    exact = spec.startswith("=")
    items = [i for i in spec.lstrip("=").split(",") if i]
    return [i for i in items if not any(n == i if exact else n.startswith(i) for n in names)]


def check_ifnames(pc: ParallelConfig, host: Host) -> list[Finding]:
    ifs = host.interfaces()
    names = sorted(ifs)
    have = ", ".join(f"{n} ({a})" if a else n for n, a in sorted(ifs.items()))
    out = []
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        spec = host.env.get(var)
        if not spec:
            level, why = ("ok", "unset: ds4f binds to the interface that routes to --master-addr") if pc.multi_node \
                else ("skip", "unset (one node: loopback)")
            out.append(Finding(var, level, why))
            continue
        if var == "NCCL_SOCKET_IFNAME":
            missing = [] if spec.startswith("^") else _nccl_matches(spec, names)
        else:
            missing = [i for i in spec.split(",") if i and i not in ifs]
        if missing:
            out.append(Finding(var, "fail", f"{spec!r} names {', '.join(missing)}, which this machine does not have "
                                            f"(it has {have})",
                               f"set {var} to the interface on the network between the nodes, e.g. "
                               f"`{var}={_best_guess(ifs)}` (see `ip -br addr`)"))
        else:
            out.append(Finding(var, "ok", f"{spec!r} found"))
    return out


def _best_guess(ifs: Mapping[str, str | None]) -> str:
    return next((n for n, a in sorted(ifs.items()) if a and n != "lo" and not a.startswith("127.")), "eth0")


def check_rdma(host: Host) -> Finding:
    name = "RDMA devices"
    devs = host.rdma_devices()
    if not _uses_ib(host):
        return Finding(name, "skip" if not devs else "ok", f"NCCL_NET is not IB; found {devs or 'none'}")
    if not devs:
        return Finding(name, "fail", "NCCL_NET=IB but /sys/class/infiniband is empty: NCCL stops with "
                                     "`NET/IB : No device found` / `Failed to initialize any NET plugin`",
                       "load the RDMA drivers (rdma-core, mlx5_ib) and, in Docker, pass `--device /dev/infiniband`; "
                       "or unset NCCL_NET to use TCP sockets")
    hca = host.env.get("NCCL_IB_HCA", "")
    wanted = [i.split(":")[0] for i in hca.lstrip("^=").split(",") if i] if hca and not hca.startswith("^") else []
    missing = [w for w in wanted if not any(d == w or d.startswith(w) for d in devs)]
    if missing:
        return Finding(name, "fail", f"NCCL_IB_HCA={hca!r} names {', '.join(missing)}; present: {', '.join(devs)}",
                       f"set NCCL_IB_HCA to present devices, e.g. NCCL_IB_HCA={devs[0]} (see `ibv_devices`)")
    return Finding(name, "ok", ", ".join(devs))


def check_master(pc: ParallelConfig, host: Host) -> Finding:
    name = "head address (--master-addr)"
    where = f"{pc.master_addr}:{pc.master_port}"
    if not pc.multi_node:
        return Finding(name, "skip", "one node: the rendezvous is on loopback")
    if pc.node_rank == 0:
        mine = {a for a in host.interfaces().values() if a}
        if pc.master_addr not in mine and pc.master_addr not in ("localhost", "127.0.0.1"):
            return Finding(name, "fail", f"{pc.master_addr} is not an address of this machine, but node 0 hosts "
                                         f"the rendezvous (it has {', '.join(sorted(mine))})",
                           "run node 0 on the machine that owns --master-addr, or set --master-addr to one of "
                           "its addresses")
        if pc.master_addr.startswith("127.") or pc.master_addr == "localhost":
            return Finding(name, "warn", f"{pc.master_addr} is loopback: only ranks on this machine can reach it",
                           "give node 0's address on the network between the nodes, e.g. --master-addr "
                           f"{host.interfaces().get(_best_guess(host.interfaces())) or '10.0.0.1'}")
        busy = host.port_free(pc.master_port)
        if busy:
            return Finding(name, "fail", f"port {pc.master_port} is {busy} here",
                           "stop the process holding it (`ss -ltnp`) or pick another --master-port on every node")
        return Finding(name, "ok", f"{where} is local and the port is free")
    err = host.connect(pc.master_addr, pc.master_port, CONNECT_TIMEOUT_S)
    if err is None:
        return Finding(name, "ok", f"{where} answers")
    if err == "refused":
        return Finding(name, "warn", f"{pc.master_addr} answers but nothing listens on port {pc.master_port} yet",
                       f"start node 0 (this node waits for it up to --join-timeout {pc.join_timeout:.0f} s)")
    return Finding(name, "fail", f"cannot reach {where} within {CONNECT_TIMEOUT_S:.0f} s: {err}",
                   "check --master-addr, the route between the nodes and the firewall (TCP --master-port plus the "
                   "gloo / NCCL ports between the nodes)")


def check_gpus(pc: ParallelConfig, device: str, host: Host) -> Finding:
    name = "GPUs"
    if device == "cpu":
        return Finding(name, "skip", "--device cpu: ranks use gloo on CPU")
    n, need = len(host.gpus()), pc.ranks_per_node
    if n == 0:
        if device == "cuda":
            return Finding(name, "fail", "--device cuda but no CUDA GPU is visible",
                           "check `nvidia-smi`, CUDA_VISIBLE_DEVICES, and in Docker `--gpus all`")
        return Finding(name, "skip", "no GPU visible: --device auto runs on CPU (gloo)")
    if n < need:
        return Finding(name, "fail", f"--tensor-parallel-size {pc.tensor_parallel_size} over --nnodes {pc.nnodes} "
                                     f"runs {need} ranks on this node, one per GPU, but {n} GPU(s) are visible",
                       f"lower --tensor-parallel-size to {n * pc.nnodes} or add nodes (--nnodes)")
    return Finding(name, "ok", f"{n} visible, {need} used on this node")


def check_memory(pc: ParallelConfig, device: str, model: str | None, host: Host) -> Finding:
    name = "memory for the weights"
    try:
        from ds4f.model.hub import resolve_model
        from ds4f.model.manifest import checkpoint_manifest
        from ds4f.model.tp import per_rank_bytes

        args = resolve_model(model).args
    except Exception as e:
        return Finding(name, "fail", f"cannot read the model's config: {e}", "check MODEL / --model")
    manifest = checkpoint_manifest(args)
    need = per_rank_bytes({n: s.nbytes for n, s in manifest.items()}, pc.world_size)
    gpus = host.gpus() if device != "cpu" else []
    loaded = per_rank_bytes({n: _loaded_bytes(s, 2 if gpus else 4) for n, s in manifest.items()}, pc.world_size)
    if gpus:
        free = min(f for f, _ in gpus[: pc.ranks_per_node])
        where = "free on the fullest GPU"
    else:
        avail = host.host_mem_available()
        if avail is None:
            return Finding(name, "skip", "cannot read /proc/meminfo")
        free, need, loaded = avail, need * pc.ranks_per_node, loaded * pc.ranks_per_node
        where = "available host memory"
    per = f"{_fmt(need)} of weights per {'GPU' if gpus else 'node'} (checkpoint formats, TP {pc.world_size})"
    if free < need:
        return Finding(name, "fail", f"{per} but only {_fmt(free)} {where}",
                       "raise --tensor-parallel-size / add nodes, or free memory (`nvidia-smi` shows who holds it)")
    if free < loaded:
        return Finding(name, "warn", f"{per}, but ds4f also keeps a dequantized copy of each FP8/FP4 weight: "
                                     f"~{_fmt(loaded)} as loaded today, and only {_fmt(free)} {where}",
                       "raise --tensor-parallel-size / add nodes until the loaded size fits")
    return Finding(name, "ok", f"{per}; {_fmt(free)} {where}")


def _loaded_bytes(spec: Any, el: int) -> int:
    """Bytes of one checkpoint tensor once ds4f has loaded it: packed FP8/FP4 weights are kept and also dequantized
    into the compute dtype (el bytes per value); bf16 tensors take the compute dtype; the rest as stored."""
    if spec.fmt == "fp8":
        return spec.nbytes + spec.numel * el
    if spec.fmt == "fp4":
        return spec.nbytes + 2 * spec.numel * el
    if spec.fmt == "bf16":
        return spec.numel * el
    return int(spec.nbytes)


def run_checks(pc: ParallelConfig, device: str = "auto", model: str | None = None, host: Host | None = None,
               cheap: bool = False) -> list[Finding]:
    """All checks (cheap=True: the ones `serve` runs at start: no network probe)."""
    host = host or Host()
    out = [check_memlock(pc, device, host), check_shm(pc, device, host), *check_ifnames(pc, host),
           check_rdma(host), check_gpus(pc, device, host), check_memory(pc, device, model, host)]
    if not cheap:
        out.append(check_master(pc, host))
    return out


def preflight(config: Any, host: Host | None = None) -> int:
    """`ds4f serve` at start: the cheap checks for this config; prints each problem (and its fix) to stderr and
    returns how many would make the launch fail."""
    pc = ParallelConfig.from_engine_config(config)
    findings = run_checks(pc, config.device, config.model, host, cheap=True)
    for f in findings:
        if f.level in ("warn", "fail"):
            print(f"ds4f serve: preflight {f.line()}", file=sys.stderr)
    return sum(f.level == "fail" for f in findings)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="as for `ds4f serve`")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29501)


def main(argv: list[str] | None = None, host: Host | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds4f doctor", description="Check this machine before `ds4f serve`: give the "
                                "same model and parallel flags you will serve with (other serve flags are ignored).")
    add_arguments(p)
    ns, _ = p.parse_known_args(argv)
    try:
        pc = ParallelConfig(tensor_parallel_size=ns.tensor_parallel_size, nnodes=ns.nnodes, node_rank=ns.node_rank,
                            master_addr=ns.master_addr, master_port=ns.master_port)
    except ValueError as e:
        print(f"ds4f doctor: error: {e}", file=sys.stderr)
        return 2
    model = ns.model_tag or ns.model
    findings = run_checks(pc, ns.device, None if model == "ds4f-tiny" else model, host)
    for f in findings:
        print(f.line())
    bad = [f for f in findings if f.level == "fail"]
    print(f"\n{len(bad)} problem(s)" + (": fix them before `ds4f serve`" if bad else ", ready to serve"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
