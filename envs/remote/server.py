"""`EnvServer`: one registered environment served over HTTP (protocol version 1).

Each episode plays on its own environment instance, taken on `POST /v1/episodes` and given up on
`DELETE`, at its last step, or after `idle_timeout_s` without a call (then closed). One given up
cleanly (its last step, `DELETE`) waits idle for the next episode of the same split and
`max_turns`, as the runners reuse theirs in process: an environment that starts an engine (TWX's
JVM, about 0.5 s) starts it once, not once per episode. Idle ones are closed after
`idle_timeout_s` and count against `max_episodes` (the oldest makes room). Every request carries
`Authorization: Bearer <token>` (401 otherwise); a body over `MAX_BODY_BYTES` is refused (413),
a malformed one answered 400 naming the field. Binds 127.0.0.1 unless told otherwise. The
standard library's threading HTTP server (`http.JsonServer`): one thread per connection, so episodes step in
parallel (`empg_envs.make` serialises environments that are not thread-safe).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from empg_envs.core import SPLITS, EnvConfigError, EnvCrashed, UnknownEnvError
from empg_envs.registry import check_config, factory_of, make
from empg_envs.remote import CRASHED, MAX_ACTION_CHARS, MAX_BODY_BYTES, MIN_TOKEN_CHARS, PREFIX, PROTOCOL_VERSION
from empg_envs.remote.http import Answer, JsonServer, RequestError, authorize, bad, body_field, json_object


@dataclass
class _Episode:
    """One open episode. `lock` is held by every call into `env`, its closing included, so an
    environment is never closed while it steps; `closed` tells a step that arrives after."""

    env: gym.Env
    #: (split, max_turns): the episodes that may reuse `env` once this one ends.
    kind: tuple[str, int]
    lock: threading.RLock = field(default_factory=threading.RLock)
    last_call: float = field(default_factory=time.monotonic)
    closed: bool = False
    #: False once a call into `env` failed: it is closed at the end, never reused.
    reusable: bool = True


class Episodes:
    """The protocol without the HTTP: answers each request with (status, JSON payload)."""

    def __init__(
        self, env_id: str, env_config: dict[str, Any], token: str, max_turns: int = 200,
        idle_timeout_s: float = 600.0, max_episodes: int = 256,
    ) -> None:
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the bearer token must have at least {MIN_TOKEN_CHARS} characters")
        for name, value in (("max_turns", max_turns), ("idle_timeout_s", idle_timeout_s), ("max_episodes", max_episodes)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        per_request = sorted({"split", "max_turns"} & set(env_config))
        if per_request:
            raise EnvConfigError(f"env_config {per_request[0]!r}: each client's request sets it, not the server")
        check_config(env_id, **env_config)
        factory, _, _ = factory_of(env_id, **env_config)
        self.env_id, self.env_config, self.token = env_id, dict(env_config), token
        self.task_types = list(getattr(factory, "task_types", ()))
        self.max_turns, self.idle_timeout_s, self.max_episodes = max_turns, idle_timeout_s, max_episodes
        self._episodes: dict[str, _Episode] = {}
        self._starting = 0  # episodes being made: they count against max_episodes too
        self._closing = False  # `close_all` ran: nothing is kept idle, nothing starts
        #: Environments of ended episodes, oldest first: (kind, env, idle since).
        self._idle: list[tuple[tuple[str, int], gym.Env, float]] = []
        self._guard = threading.Lock()

    # ---- dispatch ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, authorization: str | None, body: bytes) -> Answer:
        try:
            authorize(authorization, self.token)
            return 200, self._route(method, path, body)
        except RequestError as err:
            return err.answer()

    def _route(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        parts = path.split("?")[0].strip("/").split("/")
        if f"/{parts[0]}" != PREFIX:
            raise RequestError(404, "NotFound", f"unknown path {path!r}; this server speaks {PREFIX}/")
        rest = parts[1:]
        if method == "GET" and rest == ["info"]:
            return self.info()
        if method == "POST" and rest == ["episodes"]:
            return self.reset(json_object(body))
        if method == "POST" and len(rest) == 3 and rest[0] == "episodes" and rest[2] == "step":
            return self.step(rest[1], json_object(body))
        if method == "DELETE" and len(rest) == 2 and rest[0] == "episodes":
            return self.close(rest[1])
        raise RequestError(404, "NotFound", f"no {method} {path}")

    # ---- the protocol ----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "env": self.env_id, "task_types": self.task_types,
                "splits": list(SPLITS), "max_turns": self.max_turns, "open_episodes": len(self._episodes)}

    def reset(self, body: dict[str, Any]) -> dict[str, Any]:
        split = body_field(body, "split", (str,), "train")
        seed = body_field(body, "seed", (int,))
        task = body.get("task")
        max_turns = body_field(body, "max_turns", (int,), self.max_turns)
        if split not in SPLITS:
            raise bad(f"field 'split': expected one of {list(SPLITS)}, got {split!r}")
        if not 1 <= max_turns <= self.max_turns:
            raise bad(f"field 'max_turns': expected 1 to {self.max_turns} (the server's cap), got {max_turns}")
        self.reap()
        kind = (split, max_turns)
        with self._guard:
            if self._closing:
                raise RequestError(503, "Closing", "the server is shutting down")
            if len(self._episodes) + self._starting >= self.max_episodes:
                raise RequestError(503, "Busy", f"{self.max_episodes} episodes are open; close some first")
            env = self._take_idle(kind)
            evicted = None
            if env is None and len(self._episodes) + self._starting + len(self._idle) >= self.max_episodes:
                evicted = self._idle.pop(0)[1]  # the oldest idle environment makes room
            self._starting += 1
        try:
            if evicted is not None:
                _close(evicted)
            if env is None:
                env = self._call(lambda: make(self.env_id, split=split, max_turns=max_turns, **self.env_config))
            try:
                options = {"task": task} if task is not None else None
                observation, info = self._call(lambda: env.reset(seed=seed, options=options))
            except RequestError:
                _close(env)
                raise
            episode_id = secrets.token_hex(8)
            with self._guard:
                self._episodes[episode_id] = _Episode(env, kind)
        finally:
            with self._guard:
                self._starting -= 1
        return {"episode": episode_id, "observation": observation, "info": info}

    def step(self, episode_id: str, body: dict[str, Any]) -> dict[str, Any]:
        action = body_field(body, "action", (str,), required=True)
        if len(action) > MAX_ACTION_CHARS:
            raise bad(f"field 'action': longer than {MAX_ACTION_CHARS} characters")
        episode = self._episode(episode_id)
        with episode.lock:
            if episode.closed:
                raise self._unknown(episode_id)
            try:
                observation, reward, terminated, truncated, info = self._call(lambda: episode.env.step(action))
            except RequestError as err:
                episode.reusable = False
                if err.kind == CRASHED:
                    self._drop(episode_id)
                raise
            finally:
                episode.last_call = time.monotonic()
            if terminated or truncated:
                self._drop(episode_id, reuse=True)
        return {"observation": observation, "reward": reward, "terminated": terminated, "truncated": truncated,
                "info": info}

    def close(self, episode_id: str) -> dict[str, Any]:
        self._episode(episode_id)
        self._drop(episode_id, reuse=True)
        return {"closed": episode_id}

    # ---- episodes --------------------------------------------------------------------------
    def _unknown(self, episode_id: str) -> RequestError:
        return RequestError(404, "UnknownEpisode", f"no open episode {episode_id!r} (closed, ended or idle for "
                                                   f"more than {self.idle_timeout_s:g} s)")

    def _episode(self, episode_id: str) -> _Episode:
        with self._guard:
            episode = self._episodes.get(episode_id)
        if episode is None:
            raise self._unknown(episode_id)
        return episode

    def _take_idle(self, kind: tuple[str, int]) -> gym.Env | None:
        """The most recently idle environment of `kind`, out of the idle ones (under `_guard`)."""
        for i in range(len(self._idle) - 1, -1, -1):
            if self._idle[i][0] == kind:
                return self._idle.pop(i)[1]
        return None

    def _drop(self, episode_id: str, wait: bool = True, reuse: bool = False) -> bool:
        """End the episode: its environment idles for the next episode of its kind when `reuse`
        (and no call into it failed), else it is closed. False (nothing done) when the episode
        is not open, or when `wait` is off and a call into it is under way."""
        with self._guard:
            episode = self._episodes.get(episode_id)
        if episode is None or not episode.lock.acquire(blocking=wait):
            return False
        try:
            with self._guard:  # out of the open episodes and into the idle ones at once: never uncounted
                self._episodes.pop(episode_id, None)
                ending, episode.closed = not episode.closed, True
                keep = ending and reuse and episode.reusable and not self._closing
                if keep:
                    self._idle.append((episode.kind, episode.env, time.monotonic()))
            if ending and not keep:
                _close(episode.env)
        finally:
            episode.lock.release()
        return True

    def reap(self) -> int:
        """Close the episodes idle for more than `idle_timeout_s` (never one that is stepping),
        and the environments idle as long since their episode ended; returns how many episodes."""
        now = time.monotonic()
        with self._guard:
            idle = [i for i, e in self._episodes.items() if now - e.last_call > self.idle_timeout_s]
            stale = [env for _, env, since in self._idle if now - since > self.idle_timeout_s]
            self._idle = [entry for entry in self._idle if now - entry[2] <= self.idle_timeout_s]
        for env in stale:
            _close(env)
        return sum(self._drop(episode_id, wait=False) for episode_id in idle)

    def close_all(self) -> None:
        """Close every episode and idle environment; from now on no environment is kept idle
        (a step still under way closes its own) and no episode starts."""
        with self._guard:
            self._closing = True
            ids = list(self._episodes)
        for episode_id in ids:
            self._drop(episode_id)
        with self._guard:
            envs, self._idle = [env for _, env, _ in self._idle], []
        for env in envs:
            _close(env)

    @staticmethod
    def _call(call: Any) -> Any:
        """The environment's own errors as the protocol's: a crash is 503 (retry on a fresh
        episode), a bad task or config 400, anything else 500 naming the exception."""
        try:
            return call()
        except EnvCrashed as err:
            raise RequestError(503, CRASHED, str(err)) from err
        except (EnvConfigError, UnknownEnvError) as err:
            raise RequestError(400, type(err).__name__, str(err)) from err
        except Exception as err:  # noqa: BLE001 - reported to the client, which stops its run
            raise RequestError(500, type(err).__name__, str(err)) from err


def _close(env: gym.Env) -> None:
    with contextlib.suppress(Exception):  # a crashed engine may fail to close as well
        env.close()


class EnvServer(JsonServer):
    """`Episodes` behind a threading HTTP server (`JsonServer`), closing idle episodes on the side."""

    def __init__(self, episodes: Episodes, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(episodes, host, port, MAX_BODY_BYTES, token=episodes.token)
        self.episodes = episodes
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        threading.Thread(target=self._reap, daemon=True).start()
        super().serve_forever()

    def _reap(self) -> None:
        period = min(max(self.episodes.idle_timeout_s / 4, 0.05), 30.0)
        while not self._stop.wait(period):
            self.episodes.reap()

    def close(self) -> None:
        """Stop serving and close every open episode."""
        self._stop.set()
        super().close()
        self.episodes.close_all()
