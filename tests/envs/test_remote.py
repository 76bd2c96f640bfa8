"""Environments over HTTP: `EnvServer` (what `empg serve-env` runs) and the `http` environment,
through real HTTP on localhost: the same episodes as in process, the token, malformed requests,
idle episodes, a server that dies, and errors kept apart from crashes."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

import empg_envs
from empg_envs import EnvConfigError, EnvCrashed
from empg_envs.remote import MAX_BODY_BYTES, TOKEN_ENV
from empg_envs.remote.client import RemoteEnvError
from empg_envs.remote.server import EnvServer, Episodes

TOKEN = "test-token-0123456789"


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


def serve(env_id: str = "deepsearch", env_config: dict | None = None, **settings) -> EnvServer:
    return EnvServer(Episodes(env_id, env_config or {}, TOKEN, **settings)).start()


@pytest.fixture
def server():
    with serve() as srv:
        yield srv


def request(url: str, method: str = "GET", body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_binds_localhost_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")
    status, info = request(f"{server.url}/v1/info")
    assert status == 200 and info["protocol"] == 1 and info["env"] == "deepsearch"


def test_remote_episodes_are_the_local_ones(server, token):
    local = empg_envs.make("deepsearch", split="eval_seen", max_turns=6)
    remote = empg_envs.make("http", url=server.url, split="eval_seen", max_turns=6)
    for seed in (0, 1, 2):
        expected = local.reset(seed=seed)
        got = remote.reset(seed=seed)
        assert got[0] == expected[0] and got[1]["task_id"] == expected[1]["task_id"]
        assert got[1]["admissible_actions"] == expected[1]["admissible_actions"]
        done = False
        while not done:
            action = empg_envs.expert_action(local)
            want, have = local.step(action), remote.step(action)
            assert have[:4] == want[:4], action
            assert {k: have[4][k] for k in ("won", "score", "turn")} == {k: want[4][k] for k in ("won", "score", "turn")}
            done = want[2] or want[3]
        assert have[4]["won"]
    assert server.episodes.info()["open_episodes"] == 0  # ended episodes are closed on the server
    remote.reset(seed=5)
    remote.close()
    assert server.episodes.info()["open_episodes"] == 0


def test_requests_without_the_token_get_401(server, monkeypatch):
    for token in (None, "wrong"):
        status, answer = request(f"{server.url}/v1/info", token=token)
        assert status == 401 and answer["error"]["type"] == "Unauthorized"
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    with pytest.raises(RemoteEnvError, match="401 Unauthorized"):
        empg_envs.make("http", url=server.url).reset(seed=0)


@pytest.mark.parametrize(
    ("path", "method", "body", "status", "message"),
    [
        ("/v1/episodes", "POST", b"{not json", 400, "not JSON"),
        ("/v1/episodes", "POST", b"[1]", 400, "JSON object"),
        ("/v1/episodes", "POST", b'{"seed": "one"}', 400, "field 'seed': expected int"),
        ("/v1/episodes", "POST", b'{"split": "dev"}', 400, "field 'split'"),
        ("/v1/episodes", "POST", b'{"max_turns": 100000}', 400, "field 'max_turns'"),
        ("/v1/episodes", "POST", b'{"task": 99999999}', 400, "task"),
        ("/v1/episodes/nope/step", "POST", b'{"action": "x"}', 404, "no open episode 'nope'"),
        ("/v2/info", "GET", None, 404, "speaks /v1/"),
    ],
)
def test_malformed_requests_are_answered_naming_the_field(server, path, method, body, status, message):
    got, answer = request(f"{server.url}{path}", method, body)
    assert got == status and message in answer["error"]["message"]


def test_step_needs_a_string_action_and_bodies_are_capped(server):
    _, started = request(f"{server.url}/v1/episodes", "POST", b"{}")
    step = f"{server.url}/v1/episodes/{started['episode']}/step"
    assert request(step, "POST", b"{}")[1]["error"]["message"] == "field 'action' is required"
    assert request(step, "POST", b'{"action": 3}')[0] == 400
    status, answer = request(step, "POST", json.dumps({"action": "x" * MAX_BODY_BYTES}).encode())
    assert status == 413 and answer["error"]["type"] == "TooLarge"


def test_one_connection_carries_many_requests_errors_included(server):
    """Keep-alive: answers of every kind leave the connection usable for the next request."""
    host = urllib.parse.urlparse(server.url).netloc
    connection = http.client.HTTPConnection(host, timeout=10)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    statuses = []
    for method, path, body, headers in [
        ("GET", "/v1/info", None, {}),
        ("GET", "/v1/info", None, auth),
        ("POST", "/v1/episodes", b"{oops", auth),
        ("POST", "/v1/episodes", b"{}", auth),
        ("GET", "/v1/info", None, auth),
    ]:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        statuses.append(response.status)
        answer = json.loads(response.read())
    connection.close()
    assert statuses == [401, 200, 400, 200, 200] and answer["open_episodes"] == 1


def test_a_body_without_a_usable_length_is_refused(server, token):
    host, port = urllib.parse.urlparse(server.url).netloc.split(":")
    # The token is checked first, from the headers alone: a stranger's body is never read.
    for auth, length, status in (("", "5", 401), (f"Authorization: Bearer {token}\r\n", "abc", 400),
                                 (f"Authorization: Bearer {token}\r\n", "-5", 400)):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(f"POST /v1/episodes HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\n\r\n".encode())
            assert raw.recv(200).decode().startswith(f"HTTP/1.1 {status}")


def test_close_and_the_cap_on_open_episodes(token):
    with serve(max_episodes=2) as server:
        first, second = (empg_envs.make("http", url=server.url) for _ in range(2))
        first.reset(seed=0)
        second.reset(seed=1)
        status, answer = request(f"{server.url}/v1/episodes", "POST", b"{}")
        assert status == 503 and answer["error"]["type"] == "Busy"
        with pytest.raises(EnvCrashed, match="503 Busy"):  # the client plays it again later
            empg_envs.make("http", url=server.url).reset(seed=2)
        first.close()  # DELETE frees a place
        assert server.episodes.info()["open_episodes"] == 1
        empg_envs.make("http", url=server.url).reset(seed=2)


def test_a_close_during_a_step_waits_for_it(token):
    """The environment is never closed under a step: the DELETE waits, the step answers."""
    with serve("deepsearch", {"step_latency_ms": 300}) as server:
        env = empg_envs.make("http", url=server.url)
        env.reset(seed=0)
        episode = env.unwrapped._episode
        stepped = []

        def step() -> None:
            stepped.append(env.step("search[anything]"))
            stepped.append(time.monotonic())

        worker = threading.Thread(target=step)
        worker.start()
        time.sleep(0.1)
        assert request(f"{server.url}/v1/episodes/{episode}", "DELETE")[0] == 200
        closed_at = time.monotonic()
        worker.join()
        assert isinstance(stepped[0][0], str) and closed_at >= stepped[1] - 0.05  # the close came after the step
        assert request(f"{server.url}/v1/episodes/{episode}/step", "POST", b'{"action": "x"}')[0] == 404


def test_a_server_may_truncate_an_episode_itself(server, token):
    env = empg_envs.make("http", url=server.url, max_turns=10)
    env.reset(seed=0)
    # The server's own limit: 1 turn for this episode, whatever the client's max_turns.
    _, started = request(f"{server.url}/v1/episodes", "POST", json.dumps({"seed": 0, "max_turns": 1}).encode())
    env.unwrapped._episode = started["episode"]
    *_, terminated, truncated, _ = env.step("search[anything]")
    assert (terminated, truncated) == (False, True)


def test_a_server_refuses_a_weak_token_and_per_request_keys():
    with pytest.raises(ValueError, match="at least 16"):
        Episodes("deepsearch", {}, "")
    with pytest.raises(EnvConfigError, match="'split': each client's request sets it"):
        Episodes("deepsearch", {"split": "train"}, TOKEN)
    with pytest.raises(ValueError, match="idle_timeout_s must be > 0"):
        Episodes("deepsearch", {}, TOKEN, idle_timeout_s=0)


def test_numpy_values_in_an_info_stay_what_they_are(server):
    from empg_envs.remote.http import plain

    assert json.loads(json.dumps({"won": np.bool_(False), "score": np.float32(0.5)}, default=plain)) == {
        "won": False, "score": 0.5}


def test_idle_episodes_are_closed_and_the_client_sees_a_crash(token):
    with serve(idle_timeout_s=0.2) as server:
        env = empg_envs.make("http", url=server.url)
        env.reset(seed=0)
        time.sleep(0.6)
        assert server.episodes.info()["open_episodes"] == 0
        with pytest.raises(EnvCrashed, match="UnknownEpisode"):
            env.step("search[anything]")


def test_a_server_killed_mid_episode_is_a_crash(token):
    server = serve()
    env = empg_envs.make("http", url=server.url, timeout=5.0)
    env.reset(seed=0)
    server.close()
    with pytest.raises(EnvCrashed, match="env server"):
        env.step("search[anything]")


def test_the_servers_env_crash_is_a_crash_and_its_error_is_not(token):
    from empg_envs.registry import _REGISTRY

    empg_envs.register("test-faulty", "tests.env_doubles:FaultyEnv")
    try:
        with serve("test-faulty", {"crash_first": 1000}) as server:
            env = empg_envs.make("http", url=server.url)
            env.reset(seed=0)
            with pytest.raises(EnvCrashed, match="503 EnvCrashed"):
                env.step("ab")
            assert server.episodes.info()["open_episodes"] == 0  # a crashed episode is dropped
        with serve("test-faulty", {"error_at": "step"}) as server:
            env = empg_envs.make("http", url=server.url)
            env.reset(seed=0)
            with pytest.raises(RemoteEnvError, match="500 ValueError"):
                env.step("ab")
    finally:
        _REGISTRY.pop("test-faulty", None)


def test_an_environment_is_reused_by_the_next_episode_of_its_kind_unless_its_episode_failed(token):
    """An engine that starts a JVM starts it once: an episode that ended cleanly leaves its
    environment to the next one of the same split and max_turns; a crashed one is never reused,
    and idle ones are closed after idle_timeout_s or to make room under max_episodes."""
    from tests.env_doubles import FaultyEnv

    empg_envs.register("test-faulty", "tests.env_doubles:FaultyEnv")
    FaultyEnv.made = FaultyEnv.closed = 0
    try:
        with serve("test-faulty", {"crash_first": 1}, max_episodes=1, idle_timeout_s=0.5) as server:
            def play(max_turns: int = 3) -> None:
                env = empg_envs.make("http", url=server.url, max_turns=max_turns)
                env.reset(seed=0)
                env.step("ab")

            with pytest.raises(EnvCrashed):
                play()  # the first environment made crashes: closed, not kept
            assert FaultyEnv.closed == 1
            play()
            play()
            assert FaultyEnv.made == 2 and FaultyEnv.closed == 1  # the third episode played on the second's env
            play(max_turns=2)  # another kind: the idle one makes room under max_episodes=1
            play(max_turns=2)
            assert FaultyEnv.made == 3 and FaultyEnv.closed == 2
            time.sleep(1.2)  # closed once idle past idle_timeout_s
            play(max_turns=2)
            assert FaultyEnv.made == 4 and FaultyEnv.closed == 3
        assert FaultyEnv.closed == 4  # the server's close closes the one kept
    finally:
        from empg_envs.registry import _REGISTRY

        _REGISTRY.pop("test-faulty", None)


def test_bad_client_settings_are_refused_before_any_request(monkeypatch):
    with pytest.raises(EnvConfigError, match="url must be http"):
        empg_envs.check_config("http", url="localhost:8700")
    with pytest.raises(EnvConfigError, match="timeout"):
        empg_envs.check_config("http", url="http://127.0.0.1:1", timeout=0)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(EnvConfigError, match=f"{TOKEN_ENV}.*not set"):
        empg_envs.make("http", url="http://127.0.0.1:1")


def test_a_server_refuses_an_unknown_env_or_key():
    with pytest.raises(empg_envs.UnknownEnvError):
        Episodes("nope", {}, TOKEN)
    with pytest.raises(EnvConfigError, match="bad env_config key 'colour'"):
        Episodes("deepsearch", {"colour": "red"}, TOKEN)
