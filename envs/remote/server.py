"""`EnvServer`: one registered environment served over HTTP (protocol version 1).

Each episode is its own environment instance, made on `POST /v1/episodes` and closed on
`DELETE`, at its last step, or after `idle_timeout_s` without a call. Every request carries
`Authorization: Bearer <token>` (401 otherwise); a body over `MAX_BODY_BYTES` is refused (413),
a malformed one answered 400 naming the field. Binds 127.0.0.1 unless told otherwise. The
standard library's threading HTTP server: one thread per connection, so episodes step in
parallel (`empg_envs.make` serialises environments that are not thread-safe).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import gymnasium as gym

from empg_envs.core import SPLITS, EnvConfigError, EnvCrashed, UnknownEnvError
from empg_envs.registry import check_config, factory_of, make
from empg_envs.remote import CRASHED, MAX_ACTION_CHARS, MAX_BODY_BYTES, MIN_TOKEN_CHARS, PREFIX, PROTOCOL_VERSION


class RequestError(Exception):
    """An answer other than 200: its HTTP status, error type and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _bad(message: str) -> RequestError:
    return RequestError(400, "BadRequest", message)


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise _bad(f"field {name!r} is required")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise _bad(f"field {name!r}: expected {expected}, got {value!r}")
    return value


@dataclass
class _Episode:
    """One open episode. `lock` is held by every call into `env`, its closing included, so an
    environment is never closed while it steps; `closed` tells a step that arrives after."""

    env: gym.Env
    lock: threading.RLock = field(default_factory=threading.RLock)
    last_call: float = field(default_factory=time.monotonic)
    closed: bool = False


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
        self._guard = threading.Lock()

    # ---- dispatch ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, authorization: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            self._authorize(authorization)
            return 200, self._route(method, path, body)
        except RequestError as err:
            return err.status, {"error": {"type": err.kind, "message": str(err)}}

    def _authorize(self, authorization: str | None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        # Compared in constant time: the answer's timing says nothing about the token.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise RequestError(401, "Unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")

    def _route(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        parts = path.split("?")[0].strip("/").split("/")
        if f"/{parts[0]}" != PREFIX:
            raise RequestError(404, "NotFound", f"unknown path {path!r}; this server speaks {PREFIX}/")
        rest = parts[1:]
        if method == "GET" and rest == ["info"]:
            return self.info()
        if method == "POST" and rest == ["episodes"]:
            return self.reset(self._json(body))
        if method == "POST" and len(rest) == 3 and rest[0] == "episodes" and rest[2] == "step":
            return self.step(rest[1], self._json(body))
        if method == "DELETE" and len(rest) == 2 and rest[0] == "episodes":
            return self.close(rest[1])
        raise RequestError(404, "NotFound", f"no {method} {path}")

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _bad(f"the body is not JSON: {err}") from None
        if not isinstance(data, dict):
            raise _bad(f"the body must be a JSON object, got {type(data).__name__}")
        return data

    # ---- the protocol ----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "env": self.env_id, "task_types": self.task_types,
                "splits": list(SPLITS), "max_turns": self.max_turns, "open_episodes": len(self._episodes)}

    def reset(self, body: dict[str, Any]) -> dict[str, Any]:
        split = _field(body, "split", (str,), "train")
        seed = _field(body, "seed", (int,))
        task = body.get("task")
        max_turns = _field(body, "max_turns", (int,), self.max_turns)
        if split not in SPLITS:
            raise _bad(f"field 'split': expected one of {list(SPLITS)}, got {split!r}")
        if not 1 <= max_turns <= self.max_turns:
            raise _bad(f"field 'max_turns': expected 1 to {self.max_turns} (the server's cap), got {max_turns}")
        self.reap()
        with self._guard:
            if len(self._episodes) + self._starting >= self.max_episodes:
                raise RequestError(503, "Busy", f"{self.max_episodes} episodes are open; close some first")
            self._starting += 1
        try:
            env = self._call(lambda: make(self.env_id, split=split, max_turns=max_turns, **self.env_config))
            try:
                options = {"task": task} if task is not None else None
                observation, info = self._call(lambda: env.reset(seed=seed, options=options))
            except RequestError:
                with contextlib.suppress(Exception):
                    env.close()
                raise
            episode_id = secrets.token_hex(8)
            with self._guard:
                self._episodes[episode_id] = _Episode(env)
        finally:
            with self._guard:
                self._starting -= 1
        return {"episode": episode_id, "observation": observation, "info": info}

    def step(self, episode_id: str, body: dict[str, Any]) -> dict[str, Any]:
        action = _field(body, "action", (str,), required=True)
        if len(action) > MAX_ACTION_CHARS:
            raise _bad(f"field 'action': longer than {MAX_ACTION_CHARS} characters")
        episode = self._episode(episode_id)
        with episode.lock:
            if episode.closed:
                raise self._unknown(episode_id)
            try:
                observation, reward, terminated, truncated, info = self._call(lambda: episode.env.step(action))
            except RequestError as err:
                if err.kind == CRASHED:
                    self._drop(episode_id)
                raise
            finally:
                episode.last_call = time.monotonic()
            if terminated or truncated:
                self._drop(episode_id)
        return {"observation": observation, "reward": reward, "terminated": terminated, "truncated": truncated,
                "info": info}

    def close(self, episode_id: str) -> dict[str, Any]:
        self._episode(episode_id)
        self._drop(episode_id)
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

    def _drop(self, episode_id: str, wait: bool = True) -> bool:
        """Close the episode; False (nothing done) when it is not open, or when `wait` is off
        and a call into it is under way."""
        with self._guard:
            episode = self._episodes.get(episode_id)
        if episode is None or not episode.lock.acquire(blocking=wait):
            return False
        try:
            with self._guard:
                self._episodes.pop(episode_id, None)
            if not episode.closed:
                episode.closed = True
                with contextlib.suppress(Exception):  # a crashed engine may fail to close as well
                    episode.env.close()
        finally:
            episode.lock.release()
        return True

    def reap(self) -> int:
        """Close the episodes idle for more than `idle_timeout_s` (never one that is stepping);
        returns how many."""
        now = time.monotonic()
        with self._guard:
            idle = [i for i, e in self._episodes.items() if now - e.last_call > self.idle_timeout_s]
        return sum(self._drop(episode_id, wait=False) for episode_id in idle)

    def close_all(self) -> None:
        with self._guard:
            ids = list(self._episodes)
        for episode_id in ids:
            self._drop(episode_id)

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


def _plain(value: Any) -> Any:
    """JSON for what environments put in `info` beyond JSON's types: numpy scalars and arrays
    (a numpy bool as the string "False" would read as true)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _error(status: int, kind: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"type": kind, "message": message}}


class EnvServer:
    """`Episodes` behind a threading HTTP server: `start()` serves in background threads,
    `serve_forever()` in this one."""

    def __init__(self, episodes: Episodes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.episodes = episodes
        app = episodes

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 120  # seconds a connection may idle or stall mid-request

            def _body(self) -> bytes | tuple[int, dict[str, Any]]:
                """The request body, or the error answer when it cannot be read."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    return _error(411, "LengthRequired", "send a Content-Length, not a chunked body")
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    return _error(400, "BadRequest", "Content-Length is not a number")
                if length < 0:
                    return _error(400, "BadRequest", "Content-Length is negative")
                if length > MAX_BODY_BYTES:
                    if length <= 16 * MAX_BODY_BYTES:  # read it, so that the client sees the answer, not a reset
                        self.rfile.read(length)
                    return _error(413, "TooLarge", f"body over {MAX_BODY_BYTES} bytes")
                return self.rfile.read(length) if length else b""

            def _serve(self, method: str) -> None:
                body = self._body()
                if isinstance(body, tuple):
                    status, payload = body
                    self.close_connection = True
                else:
                    status, payload = app.handle(method, self.path, self.headers.get("Authorization"), body)
                try:
                    data = json.dumps(payload, default=_plain).encode()
                except (TypeError, ValueError) as err:
                    status, payload = _error(500, "Unserialisable", f"the environment's answer is not JSON: {err}")
                    data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def log_message(self, *args: object) -> None:  # one line per request would drown the terminal
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self._stop = threading.Event()
        self._serving = False

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> EnvServer:
        self._serving = True  # before the thread runs: a close() right away still stops it
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until `close()` (or Ctrl-C), closing idle episodes on the side."""
        threading.Thread(target=self._reap, daemon=True).start()
        self._serving = True
        self._http.serve_forever()

    def _reap(self) -> None:
        period = min(max(self.episodes.idle_timeout_s / 4, 0.05), 30.0)
        while not self._stop.wait(period):
            self.episodes.reap()

    def close(self) -> None:
        """Stop serving and close every open episode."""
        self._stop.set()
        if self._serving:
            self._http.shutdown()
        self._http.server_close()
        self.episodes.close_all()

    def __enter__(self) -> EnvServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
