"""`python -m minivllm serve`, with an engine that steps only when its frontend has spoken.

The lifecycle tests need a request that is still running when its client disconnects or when
SIGTERM arrives, however fast the machine is (a tiny model streamed 240 tokens in 0.4 s on a
2-core CPU, less than a fixed timeout in a test). Here that holds by construction. Once a step
has reported tokens, the engine process steps again only after the frontend has sent it a
command. So a request that has streamed its first tokens cannot finish: it waits until the
frontend sends an abort (the client went away, the server is shutting down), which lets the
engine run one step more (the outputs of the step in flight come out), and then serves it.
A request added while others are held steps freely until its first report, so that each
streaming request, from any frontend (`--api-server-count`), is held after its first token.

Run as a script (`python tests/serve/lockstep_server.py serve --model ...`, the arguments of
`python -m minivllm`): the engine process is spawned, and a spawned process runs its parent's
main script again (as `__mp_main__`), so the patch below applies there too, where the engine runs.
"""

import sys
from multiprocessing import connection

from minivllm.entrypoints import engine_core

WAIT_S = 120.0  # a bound on every wait, so a test that never sends a command cannot hang here

serve = engine_core.serve


class CommandPipe:
    """The engine's end of a command pipe, noting (in `told`, shared by every frontend's pipe)
    whether a command came since the last report, and which added requests have not reported."""

    def __init__(self, conn, told: dict):
        self.conn = conn
        self.told = told

    def recv(self):
        self.told["spoke"] = True
        command = self.conn.recv()
        if command[1] == "add":
            self.told["unreported"].add(command[2][2])
        elif command[1] == "abort":  # an aborted request reports nothing more
            self.told["unreported"].discard(command[2][0])
        return command

    def __getattr__(self, name):  # poll, fileno, close, ...: the pipe's own
        return getattr(self.conn, name)


def lockstep_serve(core, commands, results, frontends=()) -> None:
    told = {"spoke": True, "unreported": set()}
    commands = CommandPipe(commands, told)
    frontends = [(CommandPipe(c, told), r) for c, r in frontends]
    pipes = [c for c, _ in frontends] or [commands]
    step = core.step

    def step_when_told():
        # A frontend that has left (its pipe closed) cannot speak; waiting on its pipe would raise
        # inside the step, and fail the requests of the frontends still there.
        open_pipes = [p for p in pipes if not p.closed]
        if open_pipes and not told["spoke"] and not told["unreported"]:
            connection.wait(open_pipes, WAIT_S)  # the next command (served right after this step) allows it
        result = step()
        told["unreported"] -= {o.request_id for o in result.outputs + result.failed}
        told["spoke"] = not (result.outputs or result.failed)
        return result

    core.step = step_when_told
    serve(core, commands, results, frontends)


engine_core.serve = lockstep_serve

if __name__ == "__main__":
    from minivllm.cli import main

    sys.exit(main())
