"""The `http` environment: plays an environment that a server of protocol version 1 serves
(`empg serve-env`, or a server of the user's in any language).

    env = empg_envs.make("http", url="http://127.0.0.1:8700", split="train")

env_config: `url` (required), `token_env` (the environment variable holding the bearer token,
default EMPG_ENV_TOKEN: a token never goes into an experiment file), `timeout` (seconds per
request). A server that cannot be reached, times out, has lost the episode (restarted, or closed
it as idle) or reports its engine crashed raises `EnvCrashed`: the episode is played again on a
fresh one. Any other error the server reports (a bad task, its environment's own bug, a refused
token) raises `RemoteEnvError`, which stops the run naming the cause.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from empg_envs.core import EnvConfigError, EnvCrashed, EnvError, TextEnv
from empg_envs.remote import PREFIX, TOKEN_ENV


class RemoteEnvError(EnvError):
    """An error the environment server reported (not a crash)."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the bearer token to another address: refuse it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201, PLR0913 - urllib's signature
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


#: Straight to the server: no proxy from the environment sees the token, and no redirect.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


class RemoteEnv(TextEnv):
    #: Each call is its own HTTP request; instances share nothing.
    thread_safe = True

    def __init__(
        self, url: str, split: str = "train", max_turns: int = 50, token_env: str = TOKEN_ENV, timeout: float = 60.0
    ) -> None:
        super().__init__(max_turns=max_turns, split=split)
        self.check_config(url=url, token_env=token_env, timeout=timeout)
        token = os.environ.get(token_env)
        if not token:
            raise EnvConfigError(f"env 'http': the bearer token for {url} goes in the environment variable "
                                 f"{token_env} (env_config token_env), which is not set in this process")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._episode: str | None = None
        self._server_truncated = False

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        super().check_config(**env_config)
        if "url" in env_config:
            url = env_config["url"]
            parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise EnvConfigError(f"url must be http(s)://host:port, got {url!r}")
        if "token_env" in env_config and not (isinstance(env_config["token_env"], str) and env_config["token_env"]):
            raise EnvConfigError(f"token_env must name an environment variable, got {env_config['token_env']!r}")
        if "timeout" in env_config:
            timeout = env_config["timeout"]
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise EnvConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")

    # ---- HTTP ------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{PREFIX}{path}", data, self._headers, method=method)
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            error = _error_of(err)
            message = f"env server {self.url}: {err.code} {error.get('type', '')}: {error.get('message', err.reason)}"
            if err.code == 503 or err.code == 404 and error.get("type") == "UnknownEpisode":
                raise EnvCrashed(message) from None
            raise RemoteEnvError(message) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            raise EnvCrashed(f"env server {self.url}: {err}") from err

    # ---- protocol --------------------------------------------------------------------------
    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        self._close_episode()
        answer = self._call("POST", "/episodes", {"split": self.split, "seed": seed, "task": task,
                                                  "max_turns": self.max_turns})
        self._episode = answer["episode"]
        return answer["observation"], answer["info"]

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._episode is None:
            raise EnvCrashed(f"env server {self.url}: the episode has already ended there")
        answer = self._call("POST", f"/episodes/{self._episode}/step", {"action": action})
        self._server_truncated = bool(answer["truncated"])
        if answer["terminated"] or answer["truncated"]:
            self._episode = None  # the server closed it
        return answer["observation"], answer["reward"], answer["terminated"], answer["info"]

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        # A server may end an episode by truncation for reasons of its own (its own turn limit).
        self._server_truncated = False
        obs, reward, terminated, truncated, info = super().step(action)
        if self._server_truncated and not terminated and not truncated:
            truncated = True
            self._done = True
        return obs, reward, terminated, truncated, info

    def _close_episode(self) -> None:
        episode, self._episode = self._episode, None
        if episode is not None:
            try:
                self._call("DELETE", f"/episodes/{episode}")
            except EnvError:
                pass  # gone already (idle, restarted): nothing to free

    def close(self) -> None:
        self._close_episode()
        super().close()


def _error_of(err: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        return json.loads(err.read()).get("error", {})
    except (ValueError, AttributeError, OSError):
        return {}
