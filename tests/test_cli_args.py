"""CLI tests: `ds4f serve` flag parsing against vLLM's names, refusals of unsupported flags, dotted kwargs."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from ds4f.cli import main
from ds4f.server.args import ArgError, make_serve_parser, parse_serve_args, split_dotted

# serving-spec.md, "Target launch" (the seed's whole line).
SEED_LINE = (
    "deepseek-ai/DeepSeek-V4-Flash --tokenizer-mode deepseek_v4 --tool-call-parser deepseek_v4 "
    "--enable-auto-tool-choice --reasoning-parser deepseek_v4 --default-chat-template-kwargs.thinking=true "
    "--default-chat-template-kwargs.reasoning_effort=high --served-model-name deepseek-v4-flash "
    "--max-model-len 1000000 --enable-prefix-caching --block-size 256 --max-num-seqs 6 "
    "--max-num-batched-tokens 8192 --speculative-config mtp/2"
)
UNSUPPORTED_NOW = ("--enable-prefix-caching", "--speculative-config")


def test_seed_launch_line_parses_every_flag() -> None:
    rest, dotted = split_dotted(shlex.split(SEED_LINE))
    ns = make_serve_parser().parse_args(rest)
    assert ns.model_tag == "deepseek-ai/DeepSeek-V4-Flash"
    assert (ns.tokenizer_mode, ns.tool_call_parser, ns.reasoning_parser) == ("deepseek_v4",) * 3
    assert ns.enable_auto_tool_choice is True and ns.enable_prefix_caching is True
    assert ns.served_model_name == ["deepseek-v4-flash"]
    assert (ns.max_model_len, ns.block_size, ns.max_num_seqs, ns.max_num_batched_tokens) == (1000000, 256, 6, 8192)
    assert ns.speculative_config == "mtp/2"
    assert dotted == {"default-chat-template-kwargs": {"thinking": True, "reasoning_effort": "high"}}


def test_seed_launch_line_refuses_only_what_is_not_built_yet() -> None:
    with pytest.raises(ArgError) as e:
        parse_serve_args(shlex.split(SEED_LINE))
    msg = str(e.value)
    for flag in UNSUPPORTED_NOW:
        assert flag in msg
    assert "not supported yet" in msg
    for flag in ("--block-size", "--max-num-seqs", "--tool-call-parser", "--served-model-name"):
        assert flag not in msg


def test_seed_launch_line_without_unbuilt_features_gives_settings() -> None:
    argv = shlex.split(SEED_LINE.replace("--enable-prefix-caching", "").replace("--speculative-config mtp/2", ""))
    s = parse_serve_args(argv)
    assert s.served_model_names == ["deepseek-v4-flash"]
    assert s.model_root == "deepseek-ai/DeepSeek-V4-Flash"
    assert s.default_chat_template_kwargs == {"thinking": True, "reasoning_effort": "high"}
    assert s.enable_auto_tool_choice and s.reasoning_parser == "deepseek_v4"
    e = s.engine_kwargs
    assert (e["model"], e["max_model_len"], e["max_num_seqs"], e["block_size"]) == (
        "deepseek-ai/DeepSeek-V4-Flash", 1000000, 6, 256)
    assert s.engine_config().max_num_batched_tokens == 8192


@pytest.mark.parametrize("argv,flag", [
    (["-tp", "3", "--nnodes", "2"], "--tensor-parallel-size"),
    (["-tp", "2", "--distributed-executor-backend", "uni"], "--distributed-executor-backend"),
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size"),
    (["--nnodes", "2"], "--nnodes"),
    (["--node-rank", "1"], "--node-rank"),
    (["--headless"], "--headless"),
    (["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}'], "--speculative-config"),
    (["--speculative-config.method=mtp"], "--speculative-config"),
    (["--enable-prefix-caching"], "--enable-prefix-caching"),
    (["--distributed-executor-backend", "ray"], "--distributed-executor-backend"),
    (["--reasoning-config", '{"think_start_str": "<think>"}'], "--reasoning-config"),
    (["--tool-call-parser", "hermes"], "--tool-call-parser"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode"),
])
def test_unsupported_flags_are_refused_by_name(argv: list[str], flag: str) -> None:
    with pytest.raises(ArgError, match=flag):
        parse_serve_args(argv)


def test_no_op_defaults_of_unsupported_flags_pass() -> None:
    s = parse_serve_args(["-tp", "1", "--pipeline-parallel-size", "1", "--nnodes", "1", "--node-rank", "0",
                          "--no-enable-prefix-caching", "--distributed-executor-backend", "mp",
                          "--enable-flashinfer-autotune", "--trust-remote-code", "--master-addr", "127.0.0.1",
                          "--master-port", "29501"])
    assert s.engine_kwargs["tensor_parallel_size"] == 1 and not s.engine_kwargs["enable_prefix_caching"]


def test_dotted_kwargs_forms_merge_in_order() -> None:
    s = parse_serve_args(["--default-chat-template-kwargs", '{"thinking": false, "x": 1}',
                          "--default-chat-template-kwargs.thinking=true",
                          "--default-chat-template-kwargs.reasoning_effort", "max",
                          "--default_chat_template_kwargs.nested.key=3"])
    assert s.default_chat_template_kwargs == {"thinking": True, "x": 1, "reasoning_effort": "max",
                                              "nested": {"key": 3}}


@pytest.mark.parametrize("argv,needle", [
    (["--max-model-len.x=1"], "dotted"),
    (["--default-chat-template-kwargs.=1"], "empty key"),
    (["--default-chat-template-kwargs.thinking"], "expected a value"),
    (["--default-chat-template-kwargs", "[1, 2]"], "JSON object"),
    (["--port", "70000"], "--port"),
    (["--max-waiting", "-1"], "--max-waiting"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--block-size", "100"], "--block-size"),
])
def test_bad_values_name_the_flag(argv: list[str], needle: str) -> None:
    with pytest.raises(ArgError, match=needle):
        parse_serve_args(argv)


def test_sizes_and_aliases() -> None:
    s = parse_serve_args(["--max-model-len", "1k", "--kv-cache-memory", "2G", "--dtype", "half"])
    assert s.engine_kwargs["max_model_len"] == 1000
    assert s.engine_kwargs["kv_cache_memory"] == 2 * 1024**3
    assert s.engine_kwargs["dtype"] == "float16"
    assert parse_serve_args(["--max-model-len", "1K"]).engine_kwargs["max_model_len"] == 1024
    assert parse_serve_args(["--model", "ds4f-tiny"]).engine_kwargs["model"] is None
    assert parse_serve_args(["--kv-cache-memory-bytes", "1000"]).engine_kwargs["kv_cache_memory"] == 1000
    assert parse_serve_args(["--async-scheduling"]).engine_kwargs["async_scheduling"] is True  # vLLM's flag
    assert parse_serve_args([]).engine_kwargs["async_scheduling"] is None  # the engine's default (on at TP 1)
    assert parse_serve_args(["--no-async-scheduling"]).engine_kwargs["async_scheduling"] is False


def test_main_refuses_with_exit_2_and_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--speculative-config", "mtp/2"]) == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err and "not supported yet" in err


def test_argparse_errors_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-num-seqs", "many"])
    assert e.value.code == 2
    assert "--max-num-seqs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--no-such-flag"])
    assert e.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


def test_help_groups_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "ds4f", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for group in ("model:", "engine and KV cache:", "parallelism and multi-node:", "chat, tools and reasoning:",
                  "HTTP server:"):
        assert group in out
    assert "--default-chat-template-kwargs" in out


def test_engine_and_cli_import_without_fastapi() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ds4f.engine.async_engine, ds4f.model.deepseek_v4, ds4f.cli, ds4f.server.args\n"
        "from ds4f.server.args import parse_serve_args\n"
        "parse_serve_args(['--max-model-len', '4096'])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
