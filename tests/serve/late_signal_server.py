"""`python -m minivllm serve`, whose every frontend gets SIGTERM at the last moment before
uvicorn takes the signals over: after `serve_app` has put its own handlers in place, before
`uvicorn.Server.run`. The launcher sends SIGTERM to every frontend when it is stopped, and a
slow frontend can get it exactly there (it happened on a busy 2-core CI machine, and the server
never stopped). Run as a script, like lockstep_server.py: spawned frontends run it again, so the
patch applies in them too. Only api_server's view of `gc` changes; the engine process's is its own.
"""

import gc
import os
import signal
import sys
import types

from minivllm.entrypoints import api_server


def _freeze_then_signal() -> None:
    gc.freeze()
    os.kill(os.getpid(), signal.SIGTERM)


api_server.gc = types.SimpleNamespace(collect=gc.collect, freeze=_freeze_then_signal)

if __name__ == "__main__":
    from minivllm.cli import main

    sys.exit(main())
