"""An env worker process: `python -m empg_rllib.sampling.env_worker FD`.

Hosts environments for `env_processes.EnvProcesses` and answers its calls on the socket FD,
one at a time, until the parent closes it or is gone. Ctrl-C is the parent's to handle: the
child ignores SIGINT and ends when the parent ends it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import gymnasium as gym

from empg_envs.registry import build
from empg_rllib.sampling.env_processes import answer_error, wait_for_parent


def serve(conn: Connection) -> None:
    envs: dict[int, gym.Env] = {}
    handles = iter(range(1 << 62))
    while True:
        try:
            op, *args = conn.recv()
        except (EOFError, OSError):
            break
        try:
            value: Any = None
            if op == "make":
                target, kwargs, latency = args
                handle = next(handles)
                envs[handle] = build(target, kwargs, latency)
                value = handle
            elif op == "reset":
                handle, seed, options = args
                value = envs[handle].reset(seed=seed, options=options)
            elif op == "step":
                handle, action = args
                value = envs[handle].step(action)
            elif op == "close":
                envs.pop(args[0]).close()
            else:
                raise ValueError(f"env worker: unknown call {op!r}")
            reply = ("ok", value)
        except Exception as err:
            reply = ("error", answer_error(err))
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as err:  # nothing was sent yet
            conn.send(("error", RuntimeError(f"env worker: the environment's {op} returned what cannot be "
                                             f"sent to the runner: {type(err).__name__}: {err}")))
    for env in envs.values():
        with contextlib.suppress(Exception):
            env.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=wait_for_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(int(sys.argv[1]))
    conn.send(("ready", os.getpid()))
    serve(conn)


if __name__ == "__main__":
    main()
