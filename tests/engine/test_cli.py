"""The command line: make-model through a real `python -m minivllm` process, generate in-process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from minivllm import LLM, kernels
from minivllm.cli import build_parser, cli_words, engine_kwargs, main
from minivllm.config import EngineConfig


def test_make_model_then_generate(tmp_path, capsys):
    model = tmp_path / "tiny-qwen2"
    done = subprocess.run(
        [sys.executable, "-m", "minivllm", "make-model", str(model), "--arch", "qwen2", "--size", "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()

    args = ["generate", "--model", str(model), "--prompt", "Once upon a time", "--prompt-token-ids", "5,6,7,8",
            "--max-tokens", "6", "--attention-backend", "torch", "--json", "--no-progress"]
    assert main(args) == 0
    outputs = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in outputs] == ["Once upon a time", None]
    assert outputs[1]["prompt_token_ids"] == [5, 6, 7, 8]
    # Same engine, same greedy decoding through the Python API: the CLI adds nothing of its own.
    expected = LLM(str(model), attention_backend="torch").generate(
        ["Once upon a time", [5, 6, 7, 8]], max_tokens=6, temperature=0, use_tqdm=False)
    assert [o["outputs"][0]["token_ids"] for o in outputs] == [e.token_ids for e in expected]

    assert main(["generate", "--model", str(model), "--prompt", "Hi", "--max-tokens", "3", "--n", "2",
                 "--temperature", "0.8", "--seed", "1", "--no-progress", "--stats"]) == 0
    text = capsys.readouterr().out
    assert "=== prompt: 'Hi'" in text and "[1]" in text and "[engine]" in text


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    assert main(["make-model", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "overwrite=True" not in err
    (tmp_path / "a-file").write_text("")
    assert main(["make-model", str(tmp_path / "a-file")]) == 2  # NotADirectoryError, not a traceback
    assert "is not a directory" in capsys.readouterr().err


MINIMAL_ARGS = {"make-model": ["x"], "generate": ["--model", "m"], "serve": ["--model", "m"],
                "visualize": ["t", "--out", "o"]}


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Each command's own parser (the one whose flags its errors are worded in)."""
    parser = build_parser()
    return {name: parser.parse_args([name, *args]).command_parser for name, args in MINIMAL_ARGS.items()}


@pytest.mark.parametrize("command", ["make-model", "generate", "serve", "visualize"])
def test_help_shows_every_default(command):
    sub = _commands()[command]
    text = " ".join(sub.format_help().split())  # undo argparse's line wrapping
    shown = 0
    for action in sub._actions:
        nothing_to_show = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if not action.option_strings or nothing_to_show:
            continue
        assert f"(default: {action.default})" in text, (action.option_strings, text)
        shown += 1
    assert shown >= {"make-model": 1, "generate": 19, "serve": 13, "visualize": 0}[command]
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


def test_backend_choices_come_from_the_kernels():
    sub = _commands()["generate"]
    assert tuple(next(a for a in sub._actions if a.dest == "attention_backend").choices) == kernels.BACKENDS


@pytest.mark.parametrize("message, expected", [
    ("pass overwrite=True", "pass --overwrite"),
    ("max_tokens must be an int >= 1, got 0", "--max-tokens must be an int >= 1, got 0"),
    ("min_tokens (10) must not exceed max_tokens (5)", "--min-tokens (10) must not exceed --max-tokens (5)"),
    ("prompt 1: n (3) is larger than max_num_seqs (2)", "prompt 1: --n (3) is larger than --max-num-seqs (2)"),
    ("got seed=7 with n=2", "got --seed 7 with --n 2"),
    ("set enable_chunked_prefill=True", "set --enable-chunked-prefill"),
    ("or enable_prefix_caching=False", "or --no-enable-prefix-caching"),
    ("device='cuda' cannot be used", "--device cuda cannot be used"),
    ("attention_backend='triton' cannot run on cpu: backend='triton' needs",
     "--attention-backend triton cannot run on cpu: backend='triton' needs"),  # the kernel's own words stay
    # Left alone: paths, quoted names, words that are not about the argument, unknown names.
    ("model directory '/tmp/max_tokens' does not exist", "model directory '/tmp/max_tokens' does not exist"),
    ("/a/top_k/config.json states no context length", "/a/top_k/config.json states no context length"),
    ("a whole prompt must fit in one step", "a whole prompt must fit in one step"),
    ("seed + n - 1 < 2**64", "seed + n - 1 < 2**64"),
    ("none of max_position_embeddings, n_positions", "none of max_position_embeddings, n_positions"),
])
def test_library_words_become_flags(message, expected):
    assert cli_words(message, _commands()["generate" if "overwrite" not in message else "make-model"]) == expected


@pytest.mark.parametrize("flags, shown", [
    (["--temperature", "0.5", "--seed", str(2**64 - 1), "--n", "2"], "--seed must satisfy"),
    (["--n", "3", "--max-num-seqs", "2", "--max-num-batched-tokens", "64"],
     "--n (3) is larger than --max-num-seqs (2)"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--block-size", "0"], "--block-size must be >= 1"),
    (["--no-enable-chunked-prefill", "--max-num-batched-tokens", "64"],
     "--max-num-batched-tokens (64) is below --max-model-len"),
])
def test_generate_errors_name_flags(model_dir, capsys, flags, shown):
    code = main(["generate", "--model", str(model_dir("llama")), "--prompt", "Hi", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2 and shown in err, err
    assert "_" not in err.split("error:", 1)[1].split("/")[0]  # no Python keyword before any path


def test_generate_on_a_folder_that_is_no_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and "max-model-len" not in err and "max_model_len" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unrunnable_backend_is_refused_before_generating(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir("llama")), "--prompt", "x", "--attention-backend", "cuda"]) == 2
    assert "--attention-backend cuda cannot run on cpu" in capsys.readouterr().err


@pytest.mark.parametrize("flags, shown", [
    (["--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),  # not "or None": no such flag value
    (["--kv-cache-memory-bytes", "8MB"], "expected a size such as 256MiB, 1GiB or a number of bytes, got '8MB'"),
])
def test_flag_values_are_checked_in_command_line_terms(capsys, flags, shown):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", *flags])
    err = capsys.readouterr().err
    assert shown in err and "None" not in err, err


def test_every_engine_option_is_a_flag(model_dir):
    """Every EngineConfig field (LLM keyword) has its kebab-case flag, with its default, on both
    commands that build an engine: the flags are made from the fields, so none can be missing."""
    from minivllm.cli import engine_fields

    fields = engine_fields()
    assert {"async_scheduling", "enforce_eager", "kv_cache_memory_bytes"} <= {f.name for f in fields}
    for command in ("generate", "serve"):
        parser = _commands()[command]
        defaults = parser.parse_args(MINIMAL_ARGS[command])
        for field in fields:
            flag = "--" + field.name.replace("_", "-")
            if command == "generate" and field.name == "seed":
                continue  # generate's --seed is the per-request sampling seed (tested below)
            assert flag in parser._option_string_actions, (command, flag)
            assert getattr(defaults, field.name) == field.default
            assert parser._option_string_actions[flag].help, flag  # from the config's docstring
    args = _commands()["generate"].parse_args(["--model", "m", "--no-async-scheduling", "--enforce-eager",
                                               "--kv-cache-memory-bytes", "8MiB", "--seed", "3"])
    kwargs = engine_kwargs(args)
    assert kwargs["async_scheduling"] is False and kwargs["enforce_eager"] is True
    assert kwargs["kv_cache_memory_bytes"] == 8 << 20 and "seed" not in kwargs and args.seed == 3
    config = EngineConfig.from_dict({**kwargs, "model": str(model_dir("llama")), "attention_backend": "torch"})
    assert config.scheduler_config.async_scheduling is False


def test_engine_flags_are_one_shared_list(model_dir):
    """generate (and serve) declare the engine group through add_engine_args, and engine_kwargs
    turns it into an EngineConfig: every flag reaches its field."""
    from minivllm.cli import add_engine_args, engine_kwargs
    from minivllm.config import EngineConfig

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--block-size", "8", "--max-num-seqs", "3", "--kv-cache-memory-bytes", "2MiB",
                              "--no-enable-prefix-caching", "--max-model-len", "128", "--attention-backend", "torch"])
    config = EngineConfig.from_dict({"model": str(model_dir("llama")), **engine_kwargs(args)})
    assert config.cache_config.block_size == 8 and config.scheduler_config.max_num_seqs == 3
    assert config.cache_config.kv_cache_memory_bytes == 2 << 20 and not config.cache_config.enable_prefix_caching
    assert config.scheduler_config.max_model_len == 128
    assert config.model_config.attention_backend == "torch"
    engine_dests = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    for command in ("generate", "serve"):
        assert engine_dests <= {a.dest for a in _commands()[command]._actions}


def test_serve_binds_to_loopback_by_default_and_checks_the_port(capsys):
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--port", "70000"])
    assert "--port: must be in [0, 65535], got 70000" in capsys.readouterr().err


def test_serve_reports_a_missing_model_in_flag_words(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing"), "--max-num-seqs", "2"]) == 2
    assert "serve: error:" in capsys.readouterr().err


def test_speculative_config_flag_takes_a_json_object(model_dir, capsys):
    from minivllm.cli import engine_kwargs

    args = build_parser().parse_args(["generate", "--model", "m", "--speculative-config",
                                      '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert engine_kwargs(args)["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--speculative-config", "ngram"])
    assert "--speculative-config: expected a JSON object" in capsys.readouterr().err
    code = main(["generate", "--model", str(model_dir("llama")), "--prompt-token-ids", "5,6,7,5,6,7,5,6",
                 "--max-tokens", "6", "--no-progress", "--attention-backend", "torch", "--max-model-len", "64",
                 "--speculative-config", '{"method": "ngram"}'])
    assert code == 2 and "--speculative-config needs 'num_speculative_tokens'" in capsys.readouterr().err


@pytest.mark.parametrize("api_server_count", [1, 2])
def test_serve_reports_a_taken_port_before_loading_the_model(model_dir, tmp_path, api_server_count):
    """The port is bound first, with one frontend or several: with the weights broken, the error
    is still about the port."""
    import shutil
    import socket

    model = shutil.copytree(model_dir("llama"), tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"not a checkpoint")  # loading it would fail
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "minivllm", "serve", "--model", str(model), "--port", str(port),
                               "--api-server-count", str(api_server_count)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"minivllm serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_ctrl_c_in_generate_shows_what_finished_and_exits_130(model_dir, capsys, monkeypatch):
    """Ctrl-C after the short prompt finished: its output is printed, the long one's as far as
    it got (aborted), then one line on stderr, exit status 130, no traceback."""
    from minivllm.engine.llm_engine import LLMEngine

    real_step, finished = LLMEngine.step, []

    def step_then_ctrl_c(engine):
        if finished:  # the step after the one that finished a request
            raise KeyboardInterrupt
        outputs = real_step(engine)
        finished.extend(outputs)
        return outputs

    monkeypatch.setattr(LLMEngine, "step", step_then_ctrl_c)
    long_prompt = ",".join(str(5 + i % 400) for i in range(120))  # prefilled 8 tokens a step: still running
    code = main(["generate", "--model", str(model_dir("llama")), "--prompt", "Hi", "--prompt-token-ids", long_prompt,
                 "--max-tokens", "3", "--max-num-batched-tokens", "8", "--max-num-seqs", "2", "--json",
                 "--no-progress", "--attention-backend", "torch"])
    captured = capsys.readouterr()
    assert code == 130
    assert captured.err.strip().splitlines()[-1] == (
        "minivllm generate: interrupted: 1 of 2 prompts had finished; the others are shown as far as they got")
    short, long = json.loads(captured.out)
    assert short["outputs"][0]["finish_reason"] == "length" and len(short["outputs"][0]["token_ids"]) == 3
    assert long["outputs"][0]["finish_reason"] == "abort" and long["outputs"][0]["token_ids"] == []


def test_ctrl_c_while_the_model_loads_is_one_line(capsys, monkeypatch):
    import minivllm.llm

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minivllm.llm.LLM, "__init__", interrupted)
    assert main(["generate", "--model", "m", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == "minivllm generate: interrupted\n"
