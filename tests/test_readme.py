"""Every code block of the README runs as written, and prints what the README says it prints.

The README's ```bash and ```python blocks are run in order, from the repository root, as a reader
would paste them, with two changes only: "/tmp/..." paths point into the test's own temporary
folder, and port 8000 is a free port. A ```text block right after a code block is that block's
output, and must be exactly what it printed. A block that starts the server (`minivllm serve`)
runs in the background until the test ends, as it would in a terminal of its own, and the blocks
after it talk to it. A block that cannot run here is marked on the line before it,

    <!-- readme-test: skip: the reason -->

and is reported as skipped with that reason, never passed over in silence.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->")
BLOCK_TIMEOUT_S = 600


@dataclass
class Block:
    line: int  # where the fence opens, 1-based
    language: str
    code: str
    skip: str | None = None  # the reason, when marked
    output: str | None = None  # the ```text block that follows it

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def readme_blocks() -> list[Block]:
    """The fenced blocks of the README that hold code, each with its marker and its output."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        language, code = fence.group(1), "\n".join(lines[i + 1:end])
        marker = SKIP.fullmatch(lines[i - 1]) if i > 0 else None
        if language == "text" and blocks and blocks[-1].output is None:
            blocks[-1].output = code
        elif language in ("bash", "python"):
            blocks.append(Block(i + 1, language, code, marker.group(1) if marker else None))
        else:  # a diagram (no language): nothing to run
            assert language == "", f"README.md:{i + 1}: a ```{language} block; the test knows bash, python, text"
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_blocks_to_run():
    assert sum(b.skip is None for b in BLOCKS) >= 7 and sum(b.output is not None for b in BLOCKS) >= 4


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip], ids=str)
def test_blocks_marked_not_to_run(block):
    pytest.skip(f"{block}: {block.skip}")


def test_every_block_runs_as_written(tmp_path):
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = None
    try:
        for block in (b for b in BLOCKS if not b.skip):
            code = block.code.replace("/tmp/", f"{tmp_path}/")
            code = re.sub(r"(?<=:)8000\b|(?<=--port )8000\b", str(port), code)
            command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
            if "minivllm serve" in code:
                assert server is None, f"{block}: a second server"
                server = start_server(command, env, port, tmp_path / "server.log", block)
                continue
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            assert done.returncode == 0, f"{block} failed:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            if block.output is not None:
                assert done.stdout.strip() == block.output.strip(), f"{block} printed something else"
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGINT)
            server.wait(timeout=60)
    assert server is not None and server.returncode == 0  # the serve block ran, and Ctrl-C stopped it cleanly


def start_server(command, env, port: int, log: Path, block: Block) -> subprocess.Popen:
    """Start the block in the background; return once /health answers (or fail with its log)."""
    with open(log, "w") as out:  # a session of its own, as in its own terminal: Ctrl-C reaches all of it
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    for _ in range(BLOCK_TIMEOUT_S * 4):
        if server.poll() is not None:
            pytest.fail(f"{block} exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.kill()
    pytest.fail(f"{block}: the server was not up after {BLOCK_TIMEOUT_S} s:\n{log.read_text()}")
