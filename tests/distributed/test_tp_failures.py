"""Tensor parallelism at its edges: an impossible split is refused at the door; a worker that dies
or raises makes the driver raise a clear error (never hang), the requests of the failed step
finish with finish_reason "error", and no process outlives its LLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config import ModelConfig
from minivllm.step import SchedulerOutput
from minivllm.worker.executor import TensorParallelError
from tests.engine.conftest import random_prompts

from .conftest import CPU_ENGINE, pid_alive

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


# ---------------------------------------------------------------------------------------------
# At the door: no process is started for a split that cannot work.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,overrides,reason", [
    (3, {}, r"num_attention_heads=4 is not divisible by it"),
    (2, {"num_attention_heads": 6, "num_key_value_heads": 3},
     r"num_key_value_heads=3 neither divides by it nor divides it"),
    (2, {"intermediate_size": 129}, r"intermediate_size=129 is not divisible by it"),
])
def test_an_impossible_split_is_a_value_error_naming_tensor_parallel_size(tmp_path, size, overrides, reason):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512}
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={size} cannot split the model in .*config.json: {reason}"):
        ModelConfig(str(directory), device="cpu", tensor_parallel_size=size)


def test_more_ranks_than_gpus_is_a_value_error(model_dir, monkeypatch):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if not torch.cuda.is_available():  # pretend there is one GPU: the count is what is checked
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(ModelConfig, "_check_runnable", lambda self: None)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size=4 needs 4 GPUs .*torch sees {count}"):
        ModelConfig(str(model_dir("llama")), device="cuda", tensor_parallel_size=4)


@pytest.mark.parametrize("value,error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_tensor_parallel_size_must_be_a_positive_int(model_dir, value, error):
    with pytest.raises(error, match="tensor_parallel_size"):
        LLM(str(model_dir("llama")), tensor_parallel_size=value, **CPU_ENGINE)


@pytest.mark.parametrize("value,message", [
    ("nccl", r"all_reduce must be one of \('auto', 'dist', 'peer'\), got 'nccl'"),
    ("peer", r"all_reduce='peer' cannot run with tensor_parallel_size=2: it needs CUDA GPUs, not cpu"),
])
def test_the_all_reduce_choice_is_checked_at_the_door(model_dir, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(str(model_dir("llama")), device="cpu", tensor_parallel_size=2, all_reduce=value)


def test_auto_and_dist_keep_the_process_group_all_reduce_on_cpu(model_dir):
    """On CPU "auto" is gloo's all-reduce (what the equality tests run); one rank needs none."""
    from minivllm.distributed import SINGLE
    from minivllm.distributed.peer_all_reduce import attach_peer_all_reduce, unavailable_reason

    assert unavailable_reason(2, torch.device("cpu")) == "it needs CUDA GPUs, not cpu"
    for mode in ("auto", "dist", "peer"):  # one rank: nothing to sum, nothing to attach
        assert attach_peer_all_reduce(SINGLE, mode, torch.float32, torch.device("cpu")) is SINGLE
    with pytest.raises(ValueError, match="all_reduce must be one of"):
        attach_peer_all_reduce(SINGLE, "ring", torch.float32, torch.device("cpu"))
    with LLM(str(model_dir("llama")), tensor_parallel_size=2, **CPU_ENGINE) as llm:
        assert llm.engine.executor.runner.tp.peer is None


def test_the_cli_flag_reaches_the_config_and_errors_speak_its_words(model_dir, capsys):
    from minivllm.cli import build_parser, engine_kwargs, main

    args = build_parser().parse_args(["generate", "--model", "m", "--tensor-parallel-size", "2"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 2
    assert engine_kwargs(args)["all_reduce"] == "auto"
    args = build_parser().parse_args(["generate", "--model", "m", "--all-reduce", "dist"])
    assert engine_kwargs(args)["all_reduce"] == "dist"
    assert main(["generate", "--model", str(model_dir("llama")), "--prompt-token-ids", "5,6",
                 "--device", "cpu", "--tensor-parallel-size", "3"]) == 2
    assert "error: --tensor-parallel-size 3 cannot split the model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Failures while serving
# ---------------------------------------------------------------------------------------------
def _explode(message):
    raise RuntimeError(message)


class Bomb:
    """Pickles fine; unpickling it (which only a worker does) raises."""

    def __reduce__(self):
        return _explode, ("a worker could not read this step",)


def test_an_exception_in_a_worker_reaches_the_driver_and_stops_the_group(model_dir):
    with LLM(str(model_dir("llama")), tensor_parallel_size=2, **CPU_ENGINE) as llm:
        executor = llm.engine.executor
        [pid] = executor.worker_pids
        with pytest.raises(RuntimeError, match="already initialized in this process"):
            LLM(str(model_dir("qwen2")), tensor_parallel_size=2, **CPU_ENGINE)  # this process holds a group
        first = llm.generate(random_prompts([6]), GREEDY, use_tqdm=False)[0]
        assert first.finish_reason == "length"
        bad_step = SchedulerOutput(seqs=[], sample_rows=[], finished_seq_ids=[Bomb()])
        with pytest.raises(TensorParallelError, match=r"(?s)worker rank 1 .*failed.*a worker could not read this step"):
            executor.execute(bad_step).wait()
        request_id = llm.engine.add_request(random_prompts([5])[0], GREEDY)
        with pytest.raises(TensorParallelError, match="stopped after a failure in step"):
            llm.engine.step()  # every later step is refused: the ranks are out of step
        assert llm.engine.get_output(request_id).finish_reason == "error"
    assert not pid_alive(pid)


def test_a_worker_killed_mid_step_makes_the_driver_raise_and_finishes_its_requests(model_dir, monkeypatch):
    llm = LLM(str(model_dir("qwen3")), tensor_parallel_size=2, **CPU_ENGINE)
    executor = llm.engine.executor
    [pid] = executor.worker_pids
    request_ids = [llm.engine.add_request(p, GREEDY) for p in random_prompts([7, 12, 4], seed=3)]
    for _ in range(3):
        llm.engine.step()
    # Mid-step, by construction: the worker has been sent step 4 and is computing its half when
    # it is killed, before the driver computes its own (whose all-reduces need the worker).
    execute = executor.runner.execute

    def kill_the_worker_then_execute(step_output):
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.01)
        return execute(step_output)

    monkeypatch.setattr(executor.runner, "execute", kill_the_worker_then_execute)
    with pytest.raises(TensorParallelError, match=r"worker rank 1 \(pid \d+\) died during step 4 .*exit code -9") as err:
        llm.engine.step()
    # The driver noticed the death (the peer's sockets closed under its all-reduce), rather than
    # waiting for the collective's timeout (10 minutes) to expire.
    assert "timed out" not in str(err.value.__cause__).lower(), err.value.__cause__
    monkeypatch.undo()
    assert {llm.engine.get_output(r).finish_reason for r in request_ids} == {"error"}
    with pytest.raises(TensorParallelError, match="stopped after a failure"):
        llm.generate(random_prompts([5]), GREEDY, use_tqdm=False)
    llm.close()
    assert not pid_alive(pid)


def test_normal_exit_leaves_no_process_behind(model_dir, tmp_path):
    """A script that never closes its LLM: when the interpreter exits, its worker goes too."""
    script = tmp_path / "script.py"
    script.write_text(f"""
from minivllm import LLM
if __name__ == "__main__":
    llm = LLM({str(model_dir("opt"))!r}, tensor_parallel_size=2, dtype="float32", device="cpu",
              attention_backend="torch")
    print(*llm.engine.executor.worker_pids, flush=True)
    print(llm.generate([[5, 6, 7]], max_tokens=3, use_tqdm=False)[0].finish_reason, flush=True)
""")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    pid_line, reason = done.stdout.split()
    assert reason == "length"
    deadline = time.monotonic() + 10
    while pid_alive(int(pid_line)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(int(pid_line))
