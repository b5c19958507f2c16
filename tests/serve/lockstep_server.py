"""`python -m minivllm serve`, with an engine that steps only when its frontend has spoken.

The lifecycle tests need a request that is still running when its client disconnects or when
SIGTERM arrives, however fast the machine is: 240 tokens of a tiny model take 0.4 s on a CPU,
less than a timeout or a signal may need to land. Here that holds by construction. Once a step
has reported tokens, the engine process steps again only after the frontend has sent it a
command. So a request that has streamed its first tokens cannot finish: it waits until the
frontend sends an abort (the client went away, the server is shutting down), which lets the
engine run one step more (the outputs of the step in flight come out), and then serves it.

Run as a script (`python tests/serve/lockstep_server.py serve --model ...`, the arguments of
`python -m minivllm`): the engine process is spawned, and a spawned process runs its parent's
main script again (as `__mp_main__`), so the patch below applies there too, where the engine runs.
"""

import sys

from minivllm.entrypoints import engine_core

WAIT_S = 120.0  # a bound on every wait, so a test that never sends a command cannot hang here

serve, answer = engine_core.serve, engine_core._answer


def lockstep_serve(core, commands, results) -> None:
    step = core.step
    may_step = [True]  # no report since the frontend last spoke

    def answer_and_allow(*args):
        may_step[0] = True
        return answer(*args)

    def step_when_told():
        if not may_step[0]:
            commands.poll(WAIT_S)  # the next command (served right after this step) allows it
            may_step[0] = True
        result = step()
        if result.outputs or result.failed:
            may_step[0] = False
        return result

    engine_core._answer = answer_and_allow
    core.step = step_when_told
    serve(core, commands, results)


engine_core.serve = lockstep_serve

if __name__ == "__main__":
    from minivllm.cli import main

    sys.exit(main())
