"""`ChatEndpoint`: the policy behind an OpenAI-compatible chat-completions API, with every call
recorded token for token, for agents that bring their own loop (the `openai` client, LangChain,
their own code).

Each episode has its own base URL, `{url}/episodes/{episode}/v1`: an agent's client points there,
so the calls of concurrent episodes never mix. The endpoint applies the model's own chat template
to the request's messages, samples with the runner's engine and records, per call, the prompt ids
exactly as the engine saw them, the sampled ids, their log-probs and the weights version: one
`Turn` of the episode, one step for EMPG. The learner trains on these ids; nothing is
re-tokenised. Where an agent's next prompt does not extend its earlier calls token for token (it
edited its history, or the template re-renders the assistant's text), nothing is lost: each call
is its own row.

One thread calls the engine: requests wait in a queue and go to the engine together, once every
open episode has a call waiting or `batch_wait_s` after the first arrived. Sampling follows the
run: its temperature (a request asking another is refused: the learner scores at the run's),
`max_tokens` capped at the run's `max_new_tokens`, one choice, no streaming. Each call is seeded
from its episode and its number (a request's `seed` is mixed in), so what it samples does not
depend on which calls shared its batch, and copies of one task sample apart. The reply's content
is the sampled text without the end-of-turn token and without a stop string it ended on (the
recorded turn keeps every sampled id). `tools` go to the chat template; where the template tags
tool calls (`<tool_call>`, see `tool_calls`), the calls in a reply come back as `tool_calls`,
otherwise as the model's own text. Every request needs the run's
bearer token (401); a malformed one is answered 400 naming the field, one over the episode's call
cap 429. When the engine itself fails, every waiting call is answered 503, later ones too, and
`serve_batches()` raises the engine's error.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from empg_envs.remote.http import Answer, JsonServer, RequestError, authorize, bad, body_field, json_object
from empg_rllib.core.records import Turn
from empg_rllib.sampling.agents.tool_calls import arguments_as_objects, read_tool_calls, template_tags_tool_calls
from empg_rllib.sampling.engines.base import Completion, InferenceEngine, SamplingParams
from empg_rllib.sampling.prompting import chat_ids

#: Roles a request's messages may have.
ROLES = ("system", "user", "assistant", "tool")
#: Message keys passed to the chat template besides role and content.
TOOL_KEYS = ("name", "tool_calls", "tool_call_id")
#: The largest request body the endpoint reads: an agent's whole history (bytes).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Request keys that change nothing here (the model is the run's; the rest only reports).
IGNORED = frozenset({"model", "user", "metadata", "store", "logprobs", "top_logprobs", "stream_options"})
#: Request keys that would make the sample differ from what the learner scores.
UNSUPPORTED = frozenset({"top_p", "top_k", "frequency_penalty", "presence_penalty", "logit_bias",
                         "response_format", "tool_choice", "parallel_tool_calls", "min_p", "repetition_penalty"})


@dataclass
class _Call:
    """One request waiting for the engine."""

    episode: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    result: Future = field(default_factory=Future)


@dataclass
class _Episode:
    seed_of: Callable[[int], int]  # a call's seed from its number
    turns: list[Turn] = field(default_factory=list)
    calls: int = 0  # requests taken, answered or not


class ChatEndpoint:
    """The OpenAI-compatible chat endpoint of one env runner's engine (see the module's doc).

    `open_episode()` gives an episode's base URL; `close_episode()` hands back its recorded
    turns. `before_batch` is called before every engine batch (asynchronous sampling loads new
    weights there), in the thread that calls the engine.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        tokenizer: Any,
        token: str,
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        max_prompt_tokens: int = 4096,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        batch_wait_s: float = 0.01,
        model_name: str = "policy",
        max_calls: int = 256,
        before_batch: Callable[[], None] | None = None,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        if len(token) < 16:
            raise ValueError("the bearer token must have at least 16 characters")
        self.engine, self.tokenizer, self.token = engine, tokenizer, token
        self.temperature, self.max_new_tokens, self.max_prompt_tokens = temperature, max_new_tokens, max_prompt_tokens
        self.seed, self.batch_wait_s, self.model_name, self.max_calls = seed, batch_wait_s, model_name, max_calls
        self.before_batch, self.after_batch = before_batch, after_batch
        self._episodes: dict[str, _Episode] = {}
        self._guard = threading.Lock()  # the episodes, `_closing`, and every put into the queue
        self._closing, self._closing_why = False, ""
        self._template = threading.Lock()  # a fast tokenizer is not safe across threads
        self.tags_tool_calls = template_tags_tool_calls(tokenizer)
        self._queue: queue.Queue[_Call | None] = queue.Queue()
        self._server = JsonServer(self, host, port, MAX_BODY_BYTES, token=token)
        self.engine_error: BaseException | None = None
        self._batcher: threading.Thread | None = None
        self.engine_batches = 0
        self.engine_seconds = 0.0

    # ---- life ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._server.url

    def start(self, engine_thread: bool = True) -> ChatEndpoint:
        """Serve HTTP in the background; the engine is called from a thread of its own, or with
        `engine_thread=False` from whichever thread runs `serve_batches()` (the env runner's)."""
        self._server.start()
        if engine_thread:
            self._batcher = threading.Thread(target=self._serve_in_background, name="endpoint-engine", daemon=True)
            self._batcher.start()
        return self

    def _serve_in_background(self) -> None:
        with contextlib.suppress(BaseException):  # kept in `engine_error`; every call is refused
            self.serve_batches()

    def stop_batches(self) -> None:
        """Let `serve_batches()` return once the batch under way is answered."""
        self._queue.put(None)

    def refuse_calls(self, why: str) -> None:
        """Answer 503 to every call waiting and to every later one."""
        with self._guard:
            self._closing = True
            self._closing_why = why
        self._refuse_waiting()

    def close(self) -> None:
        """Stop serving; calls still waiting are answered 503."""
        self.stop_batches()
        if self._batcher is not None:
            self._batcher.join()
        self.refuse_calls("the endpoint is closed")
        self._server.close()

    def __enter__(self) -> ChatEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- episodes ------------------------------------------------------------------------------
    def open_episode(self, name: str | None = None, seed_of: Callable[[int], int] | None = None) -> str:
        """A new episode's base URL for an `openai` client (`base_url=`, `api_key=` the token).
        `seed_of(n)` seeds its n-th call (default: from the endpoint's seed, the name and n)."""
        name = name or secrets.token_hex(8)
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"an episode name has letters, digits, '-' and '_' only, got {name!r}")
        with self._guard:
            if name in self._episodes:
                raise ValueError(f"episode {name!r} is already open")
            self._episodes[name] = _Episode(seed_of or functools.partial(self.call_seed, name))
        return f"{self.url}/episodes/{name}/v1"

    def close_episode(self, name: str) -> list[Turn]:
        """The episode's calls as turns, in the order they were answered; later calls get 404,
        and a call being sampled is not recorded."""
        with self._guard:
            return self._episodes.pop(name).turns

    # ---- HTTP ----------------------------------------------------------------------------------
    def handle(self, method: str, path: str, authorization: str | None, body: bytes) -> Answer:
        try:
            authorize(authorization, self.token)
            parts = path.split("?")[0].strip("/").split("/")
            if len(parts) < 3 or parts[0] != "episodes" or parts[2] != "v1":
                raise RequestError(404, "NotFound", f"unknown path {path!r}; an episode's base URL is /episodes/<id>/v1")
            name, rest = parts[1], parts[3:]
            if method == "GET" and rest == ["models"]:
                self._episode(name)
                return 200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "empg"}]}
            if method == "POST" and rest == ["chat", "completions"]:
                return 200, self.complete(name, json_object(body))
            raise RequestError(404, "NotFound", f"no {method} {path}")
        except RequestError as err:
            return err.answer()

    def _episode(self, name: str) -> _Episode:
        with self._guard:
            episode = self._episodes.get(name)
        if episode is None:
            raise RequestError(404, "UnknownEpisode", f"no open episode {name!r}")
        return episode

    def complete(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion for episode `name`: checked, queued, sampled, recorded."""
        episode = self._episode(name)
        prompt, params, seed, tools = self._parse(body)
        with self._guard:
            if self._closing:
                raise RequestError(503, "Closed", self._closing_why)
            if episode.calls >= self.max_calls:
                raise RequestError(429, "TooManyCalls", f"episode {name!r} made {self.max_calls} calls, the run's cap")
            number = episode.calls
            episode.calls += 1
            derived = episode.seed_of(number)
            call = _Call(name, prompt, params, derived if seed is None else zlib.crc32(f"{derived}/{seed}".encode()))
            self._queue.put(call)
        completion: Completion = call.result.result()
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}  # `content()`, set in `_sample`
        finish = "length" if completion.finish_reason == "length" else "stop"
        if tools and self.tags_tool_calls:
            message["content"], calls = read_tool_calls(completion.text, f"call-{name}-{number}")
            if calls:
                message["tool_calls"] = calls
                finish = finish if finish == "length" else "tool_calls"
        return {
            "id": f"chatcmpl-{name}-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(completion.token_ids),
                      "total_tokens": len(prompt) + len(completion.token_ids)},
        }

    def _parse(self, body: dict[str, Any]) -> tuple[list[int], SamplingParams, int | None, list[Any] | None]:
        """The request's prompt ids, sampling parameters, seed and tools, or a 400 naming the field."""
        unsupported = sorted(UNSUPPORTED & set(body))
        if unsupported:
            raise bad(f"field {unsupported[0]!r} is not supported: the learner scores the run's sampling distribution")
        unknown = sorted(set(body) - UNSUPPORTED - IGNORED - {
            "messages", "max_tokens", "max_completion_tokens", "temperature", "n", "stream", "stop", "seed", "tools"})
        if unknown:
            raise bad(f"unknown field {unknown[0]!r}")
        if body_field(body, "stream", (bool,), False):
            raise bad("field 'stream': streaming is not supported; send stream=false")
        if body_field(body, "n", (int,), 1) != 1:
            raise bad("field 'n': one choice per call (each call is one step of the episode)")
        temperature = body_field(body, "temperature", (int, float), self.temperature)
        if abs(temperature - self.temperature) > 1e-9:
            raise bad(f"field 'temperature': the run samples at {self.temperature:g} (the learner scores at it), "
                      f"got {temperature:g}")
        limit = body_field(body, "max_completion_tokens", (int,), body_field(body, "max_tokens", (int,), self.max_new_tokens))
        if not 1 <= limit <= self.max_new_tokens:
            raise bad(f"field 'max_tokens': expected 1 to {self.max_new_tokens} (the run's max_new_tokens), got {limit}")
        stop = body_field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise bad("field 'stop': up to 4 non-empty strings")
        seed = body_field(body, "seed", (int,))
        tools = body_field(body, "tools", (list,))
        prompt = self._prompt_ids(_messages(body_field(body, "messages", (list,), required=True)), tools)
        if len(prompt) > self.max_prompt_tokens:
            raise bad(f"field 'messages': {len(prompt)} prompt tokens, over the run's {self.max_prompt_tokens}")
        return prompt, SamplingParams(max_new_tokens=limit, temperature=self.temperature, stop=tuple(stop)), seed, tools

    def _prompt_ids(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> list[int]:
        try:
            with self._template:
                return chat_ids(self.tokenizer, messages, tools)
        except Exception as err:  # noqa: BLE001 - the template's own complaint, for the agent's author
            raise bad(f"field 'messages': the model's chat template refused them: {err}") from None

    def call_seed(self, name: str, number: int) -> int:
        """A call's seed from the run's, the episode and the call's number: what it samples does not
        depend on which other calls shared its batch."""
        return zlib.crc32(f"{self.seed}/{name}/{number}".encode())

    def content(self, completion: Completion, stop: Sequence[str]) -> str:
        """What the agent reads: the sampled text without a final end-of-turn token and without
        the stop string it ended on."""
        ids = list(completion.token_ids)
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop:
            if text.endswith(s):
                return text[: -len(s)]
        return text

    # ---- the engine's thread ---------------------------------------------------------------------
    def serve_batches(self) -> None:
        """Answer queued calls in engine batches until `stop_batches()`. An engine failure
        refuses every call from then on and is raised here."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            calls = self._gather(first)
            stop = any(c is None for c in calls)
            try:
                self._generate([c for c in calls if c is not None])
            except BaseException as err:
                self.engine_error = err
                for call in calls:
                    if call is not None and not call.result.done():
                        call.result.set_exception(RequestError(503, "EngineFailed", f"{type(err).__name__}: {err}"))
                self.refuse_calls(f"the engine failed: {type(err).__name__}: {err}")
                raise
            if stop:
                return

    def _gather(self, first: _Call) -> list[_Call | None]:
        """`first` and what joins it: until every open episode waits, or `batch_wait_s`."""
        calls: list[_Call | None] = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            with self._guard:
                waiting_for = len(self._episodes)
            if len(calls) >= waiting_for:
                return calls
            left = deadline - time.monotonic()
            try:
                call = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return calls
            calls.append(call)
            if call is None:
                return calls

    def _generate(self, calls: Sequence[_Call]) -> None:
        if self.before_batch is not None:
            self.before_batch()
        for params, group in itertools.groupby(sorted(calls, key=lambda c: repr(c.params)), key=lambda c: c.params):
            self._sample(list(group), params)
        if self.after_batch is not None:
            self.after_batch()

    def _sample(self, calls: list[_Call], params: SamplingParams) -> None:
        """One engine call. A request the engine refuses (ValueError: a prompt over its context)
        fails alone: the others are sampled again without it."""
        t0 = time.perf_counter()
        try:
            completions = self.engine.generate([c.prompt for c in calls], params, seeds=[c.seed for c in calls])
        except ValueError as err:
            if len(calls) == 1:
                calls[0].result.set_exception(bad(f"the engine refused the request: {err}"))
                return
            for call in calls:
                self._sample([call], params)
            return
        self.engine_seconds += time.perf_counter() - t0
        self.engine_batches += 1
        for call, completion in zip(calls, completions):
            completion.text = self.content(completion, params.stop)
            turn = Turn(call.prompt, completion.token_ids, completion.logprobs, completion.entropies,
                        completion.finish_reason, completion.weights_version, completion.text, None)
            with self._guard:
                episode = self._episodes.get(call.episode)
                if episode is not None:  # closed while it sampled: the agent gave up on it
                    episode.turns.append(turn)
            call.result.set_result(completion)

    def _refuse_waiting(self) -> None:
        stopping = False
        while True:
            try:
                call = self._queue.get_nowait()
            except queue.Empty:
                break
            if call is None:
                stopping = True
            else:
                call.result.set_exception(RequestError(503, "Closed", self._closing_why))
        if stopping:  # `serve_batches` still has to see it
            self._queue.put(None)


def _messages(raw: list[Any]) -> list[dict[str, Any]]:
    """Chat messages with text content (a list of text parts is joined), or a 400 naming the one."""
    if not raw:
        raise bad("field 'messages': at least one message")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad(f"field 'messages[{i}]': expected an object, got {message!r}")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"field 'messages[{i}].role': expected one of {list(ROLES)}, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"field 'messages[{i}].content': only text parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"field 'messages[{i}].content': expected a string, got {content!r}")
        # Tool calls and their answers go to the template as the agent sent them, the calls'
        # arguments as the objects templates render.
        extra = {k: message[k] for k in TOOL_KEYS if k in message}
        if "tool_calls" in extra:
            extra["tool_calls"] = arguments_as_objects(extra["tool_calls"])
        out.append({**extra, "role": role, "content": content})
    return out
