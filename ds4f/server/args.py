"""CLI stage: `ds4f serve` argv (vLLM's flag names) in, validated ServeSettings (EngineConfig + server options) out."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TINY_MODEL = "ds4f-tiny"
PARSER_NAMES = ("deepseek_v4",)
TOKENIZER_MODES = ("auto", "deepseek_v4")
# Flags whose JSON value may also be given key by key: `--default-chat-template-kwargs.thinking=true`.
DICT_FLAGS = ("default-chat-template-kwargs", "speculative-config", "reasoning-config")
DEFAULT_MAX_BODY_BYTES = 64 << 20


class ArgError(ValueError):
    """A flag value ds4f cannot accept; the message names the flag and the fix."""


@dataclass
class ServeSettings:
    engine_kwargs: dict[str, Any]
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=lambda: [TINY_MODEL])
    model_root: str = TINY_MODEL
    api_key: str | None = None
    tool_call_parser: str | None = "deepseek_v4"
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = "deepseek_v4"
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_waiting: int | None = None
    max_num_seqs: int = 256
    shutdown_timeout: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    uvicorn_log_level: str = "info"
    headless: bool = False  # a worker node: run its TP ranks, no HTTP (ds4f.distributed.worker.run_headless)

    def engine_config(self) -> Any:
        from ds4f.config import EngineConfig

        return EngineConfig.from_kwargs(**self.engine_kwargs)


def _size(text: str) -> int:
    """'4096', '1k' (1000), '1K' / '1KiB' (1024), '2G', '8GiB' -> an int."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected an integer with an optional k/K/m/M/g/G suffix, got {text!r}")
    num, unit, tail = float(m.group(1)), m.group(2), m.group(3)
    power = " kmgt".index(unit.lower()) if unit else 0
    base = 1024 if (unit.isupper() or tail.lower().startswith("i")) else 1000
    return int(num * base**power)


def _json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _json_dict(text: str) -> Any:
    value = _json_or_str(text)
    if isinstance(value, str) and value.strip().startswith("{"):
        raise argparse.ArgumentTypeError(f"invalid JSON object {text!r}")
    return value


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """All `vllm serve` flags ds4f understands, grouped as in `ds4f serve --help`."""
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint dir, Hugging Face repo id (offline cache) or 'ds4f-tiny'; default: the tiny model")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="same as the positional MODEL")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json file or dir (default: the model's own)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients send as `model`; the first is reported (default: MODEL)")
    g.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted for vLLM compatibility; ds4f runs no remote code")
    g.add_argument("--tokenizer-mode", default="auto", help=f"one of {TOKENIZER_MODES} (both mean the V4 encoder)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    g = p.add_argument_group("engine and KV cache")
    g.add_argument("--max-model-len", type=_size, default=None, help="context length (1k = 1000, 1K = 1024)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per engine step")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="bounded waiting queue: past max-num-seqs + this, requests get 429 (default: unbounded)")
    g.add_argument("--block-size", type=int, default=256)
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8", "fp8_e4m3"])
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", type=_size, default=None,
                   help="KV cache bytes, e.g. 20G (overrides --gpu-memory-utilization)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--runner", default="auto", choices=["auto", "fast", "reference"],
                   help="model runner: fast = GPU fast path (Triton kernels, CUDA-graph decode), reference = "
                        "plain-torch model; auto = fast on CUDA with bfloat16 and --tensor-parallel-size 1")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="fast runner: launch each steady decode step before the previous step's tokens reach the "
                        "host, so scheduling, output handling and the TP broadcast overlap the GPU (default: on; "
                        "--no-async-scheduling turns it off)")
    g.add_argument("--speculative-config", type=_json_dict, default=None, help="JSON, e.g. mtp/2 (not supported yet)")
    g.add_argument("--enable-flashinfer-autotune", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted for vLLM compatibility; no effect (ds4f has no FlashInfer)")

    g = p.add_argument_group("parallelism and multi-node")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--distributed-executor-backend", default=None, help="mp | uni (single process); ray is refused")
    g.add_argument("--nnodes", type=int, default=1)
    g.add_argument("--node-rank", type=int, default=0)
    g.add_argument("--master-addr", default="127.0.0.1")
    g.add_argument("--master-port", type=int, default=29501)
    g.add_argument("--headless", action=argparse.BooleanOptionalAction, default=False,
                   help="a worker node (--node-rank >= 1): run its ranks only, no HTTP")
    g.add_argument("--distributed-timeout", type=float, default=60.0,
                   help="seconds a collective (or a silent rank) may take before every rank exits 1")
    g.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds a node waits for the others to join (and load the model)")

    g = p.add_argument_group("chat, tools and reasoning")
    g.add_argument("--tool-call-parser", default="deepseek_v4", help=f"one of {PARSER_NAMES}")
    g.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=False,
                   help="allow tool_choice 'auto' (without it such requests get 400, as in vLLM)")
    g.add_argument("--reasoning-parser", default="deepseek_v4", help=f"one of {PARSER_NAMES}, or 'none'")
    g.add_argument("--reasoning-config", type=_json_dict, default=None, help="JSON (not supported yet)")
    g.add_argument("--default-chat-template-kwargs", type=_json_dict, default=None,
                   help="JSON object, or key by key: --default-chat-template-kwargs.thinking=true (repeatable)")

    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="after SIGTERM, seconds to let running requests finish before aborting them")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        nxt = target.setdefault(key, {})
        if not isinstance(nxt, dict):
            nxt = target[key] = {}
        target = nxt
    target[path[-1]] = value


def split_dotted(argv: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Pull `--flag.key[.sub]=value` / `--flag.key value` out of argv (for DICT_FLAGS); `_` in flag names -> `-`."""
    rest: list[str] = []
    dotted: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            rest.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        head, dot, keys = name.partition(".")
        head = head.replace("_", "-")
        if not dot:
            rest.append(f"--{head}{eq}{value}")
            continue
        if head not in DICT_FLAGS:
            raise ArgError(f"--{name}: only {', '.join('--' + f for f in DICT_FLAGS)} take dotted keys")
        if not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                raise ArgError(f"--{name}: expected a value, e.g. --{name}=true")
            value = argv[i]
            i += 1
        if not keys or any(not k for k in keys.split(".")):
            raise ArgError(f"--{name}: empty key; write --{head}.KEY=VALUE")
        _set_path(dotted.setdefault(head, {}), keys.split("."), _json_or_str(value))
    return rest, dotted


def _merge(base: Any, extra: dict[str, Any], flag: str) -> dict[str, Any] | None:
    if base is None and not extra:
        return None
    if base is not None and not isinstance(base, dict):
        if extra:
            raise ArgError(f"--{flag}: cannot combine a non-object value {base!r} with dotted keys")
        return base
    merged = dict(base or {})
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return merged


# Refused until the engine grows the feature: (flag, is-set predicate, reason). A no-op default always passes.
_NOT_YET: list[tuple[str, str, Any, str]] = [
    ("--speculative-config", "speculative_config", lambda v: v not in (None, {}, ""),
     "MTP speculative decoding is not supported yet; drop the flag"),
    ("--pipeline-parallel-size", "pipeline_parallel_size", lambda v: v != 1,
     "pipeline parallelism is not supported yet; use 1"),
    ("--reasoning-config", "reasoning_config", lambda v: v not in (None, {}),
     "reasoning budgets are not supported yet; drop the flag"),
    ("--distributed-executor-backend", "distributed_executor_backend", lambda v: v not in (None, "mp", "uni"),
     "only the single-process backends 'mp' / 'uni' are supported yet"),
]


def settings_from_namespace(ns: argparse.Namespace, dotted: dict[str, dict[str, Any]] | None = None) -> ServeSettings:
    """Validate flags and build ServeSettings; every refusal is an ArgError naming the flag and the fix."""
    dotted = dotted or {}
    ns.default_chat_template_kwargs = _merge(ns.default_chat_template_kwargs,
                                             dotted.get("default-chat-template-kwargs", {}),
                                             "default-chat-template-kwargs")
    ns.speculative_config = _merge(ns.speculative_config, dotted.get("speculative-config", {}), "speculative-config")
    ns.reasoning_config = _merge(ns.reasoning_config, dotted.get("reasoning-config", {}), "reasoning-config")
    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        raise ArgError(f"MODEL {ns.model_tag!r} and --model {ns.model!r} disagree; give the model once")
    model = ns.model_tag or ns.model
    errors = [f"{flag} {getattr(ns, attr)!r}: {why}"
              for flag, attr, is_set, why in _NOT_YET if is_set(getattr(ns, attr))]
    if ns.tokenizer_mode not in TOKENIZER_MODES:
        errors.append(f"--tokenizer-mode {ns.tokenizer_mode!r}: only {TOKENIZER_MODES} are supported")
    if ns.tool_call_parser not in PARSER_NAMES:
        errors.append(f"--tool-call-parser {ns.tool_call_parser!r}: ds4f only has {PARSER_NAMES}")
    reasoning_parser = None if ns.reasoning_parser in ("none", "") else ns.reasoning_parser
    if reasoning_parser is not None and reasoning_parser not in PARSER_NAMES:
        errors.append(f"--reasoning-parser {ns.reasoning_parser!r}: ds4f only has {PARSER_NAMES} (or 'none')")
    kwargs = ns.default_chat_template_kwargs
    if kwargs is not None and not isinstance(kwargs, dict):
        errors.append(f"--default-chat-template-kwargs {kwargs!r}: expected a JSON object, "
                      "e.g. '{\"thinking\": true}'")
    if not 0 < ns.port < 65536:
        errors.append(f"--port {ns.port}: must be in 1..65535")
    if ns.shutdown_timeout < 0:
        errors.append(f"--shutdown-timeout {ns.shutdown_timeout}: must be >= 0")
    if ns.max_waiting is not None and ns.max_waiting < 0:
        errors.append(f"--max-waiting {ns.max_waiting}: must be >= 0")
    dtype = {"half": "float16", "float": "float32"}.get(ns.dtype, ns.dtype)
    engine_kwargs: dict[str, Any] = dict(
        model=None if model in (None, TINY_MODEL) else model, tokenizer=ns.tokenizer,
        served_model_name=(ns.served_model_name or [None])[0], dtype=dtype, device=ns.device,
        load_format=ns.load_format, seed=ns.seed, max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, block_size=ns.block_size,
        kv_cache_dtype=ns.kv_cache_dtype, gpu_memory_utilization=ns.gpu_memory_utilization,
        kv_cache_memory=ns.kv_cache_memory, enable_prefix_caching=ns.enable_prefix_caching,
        tensor_parallel_size=ns.tensor_parallel_size, nnodes=ns.nnodes, node_rank=ns.node_rank,
        master_addr=ns.master_addr, master_port=ns.master_port, distributed_timeout=ns.distributed_timeout,
        join_timeout=ns.join_timeout,
        max_waiting=ns.max_waiting if ns.max_waiting else None, runner=ns.runner, async_scheduling=ns.async_scheduling,
    )
    try:
        from ds4f.config import EngineConfig

        EngineConfig.from_kwargs(**engine_kwargs)
    except ImportError:  # pragma: no cover - config.py is part of the package
        pass
    except (ValueError, TypeError) as e:
        msg = str(e)
        if "not built yet" in msg or "only 1 is supported" in msg:
            msg += " (not supported yet)"
        errors.append(msg)
    if ns.distributed_executor_backend == "uni" and ns.tensor_parallel_size > 1:
        errors.append(f"--distributed-executor-backend uni runs one process; use mp (the default) for "
                      f"--tensor-parallel-size {ns.tensor_parallel_size}")
    if ns.headless and ns.node_rank == 0:
        errors.append("--headless: node 0 runs the scheduler and serves HTTP; use --headless only with --node-rank "
                      ">= 1 (or drop it on node 0)")
    if errors:
        raise ArgError("\n  ".join(errors))
    names = ns.served_model_name or [model or TINY_MODEL]
    return ServeSettings(
        headless=ns.headless,
        engine_kwargs=engine_kwargs, host=ns.host, port=ns.port, served_model_names=list(names),
        model_root=model or TINY_MODEL, api_key=ns.api_key, tool_call_parser=ns.tool_call_parser,
        enable_auto_tool_choice=ns.enable_auto_tool_choice, reasoning_parser=reasoning_parser,
        default_chat_template_kwargs=dict(kwargs or {}),
        # 0 means "no waiting room": requests beyond max-num-seqs get 429 straight away.
        max_waiting=ns.max_waiting, max_num_seqs=ns.max_num_seqs,
        shutdown_timeout=ns.shutdown_timeout, uvicorn_log_level=ns.uvicorn_log_level,
    )


def make_serve_parser(prog: str = "ds4f serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=_Formatter,
                                description="Serve DeepSeek-V4-Flash behind an OpenAI-compatible API "
                                            "(a drop-in for `vllm serve`: same flag names).")
    add_serve_arguments(p)
    return p


def parse_serve_args(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> ServeSettings:
    """argv after `serve` -> ServeSettings; raises ArgError (argparse's own errors exit 2 as usual)."""
    parser = parser or make_serve_parser()
    rest, dotted = split_dotted(argv)
    return settings_from_namespace(parser.parse_args(rest), dotted)
