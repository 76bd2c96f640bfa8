"""The chat endpoint through the real `openai` client: token-exact capture the learner scores
alike, episodes that never mix, seeded calls, and the answers to bad requests."""

from __future__ import annotations

import copy
import json
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch

from empg_rllib.core.batch import build_turn_batch
from empg_rllib.core.records import Episode
from empg_rllib.core.scoring import response_scores
from empg_rllib.sampling.agents.endpoint import ChatEndpoint
from empg_rllib.sampling.agents.tool_calls import read_tool_calls
from empg_rllib.sampling.engines.base import Completion
from empg_rllib.sampling.engines.hf import HFEngine
from empg_rllib.sampling.prompting import chat_ids
from tests.helpers import DeadEngine

TOKEN = "endpoint-test-token-0123456789"
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def endpoint(tiny_model):
    tokenizer, model = tiny_model
    engine = HFEngine(model, tokenizer, seed=0)
    with ChatEndpoint(engine, tokenizer, TOKEN, temperature=TEMPERATURE, max_new_tokens=12, batch_wait_s=1.0) as ep:
        yield ep


def client(base_url: str, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60)


def chat(c: openai.OpenAI, messages: list[dict], **kwargs) -> str:
    return c.chat.completions.create(model="policy", messages=messages, **kwargs).choices[0].message.content


def play(endpoint: ChatEndpoint, name: str, task: str, calls: int = 3) -> tuple[list[dict], list]:
    """An agent of its own: keeps its history, sends it whole each call."""
    c = client(endpoint.open_episode(name))
    messages = [{"role": "system", "content": f"You solve {task}."}, {"role": "user", "content": f"Start {task}."}]
    sent = []
    for i in range(calls):
        sent.append(list(messages))
        answer = chat(c, messages, temperature=TEMPERATURE)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"Observation {i} of {task}."}]
    return sent, endpoint.close_episode(name)


def test_every_call_is_recorded_as_sampled_and_the_learner_scores_the_same_log_probs(endpoint, tiny_model):
    tokenizer, model = tiny_model
    sent, turns = play(endpoint, "parity", "the kitchen")
    assert len(turns) == 3
    for messages, turn in zip(sent, turns):
        # The model's own template, applied by the endpoint; the sampled ids kept as they are.
        assert turn.prompt_ids == chat_ids(tokenizer, messages)
        ids = turn.response_ids[:-1] if turn.response_ids[-1] == tokenizer.eos_token_id else turn.response_ids
        assert turn.action == tokenizer.decode(ids, skip_special_tokens=True)  # what the agent read
        assert len(turn.logprobs) == len(turn.response_ids) > 0
    # The learner's pass over the episode's rows: its batch builder, response-only scoring.
    batch = build_turn_batch([Episode("parity", "chat", 0, turns=turns)], pad_id=tokenizer.pad_token_id)
    ids, mask, resp = (torch.as_tensor(getattr(batch, k)) for k in ("input_ids", "attention_mask", "resp_mask"))
    with torch.no_grad():
        logp, _ = response_scores(model, ids, mask, resp, TEMPERATURE)
    on = batch.resp_mask > 0
    assert on.sum() == sum(len(t.response_ids) for t in turns)
    assert np.abs(logp.numpy()[on] - batch.sampler_logp[on]).max() < 1e-4


def test_concurrent_episodes_never_mix_and_share_engine_batches(endpoint, tiny_model):
    tokenizer, _ = tiny_model
    tasks = {"left": "the red box", "right": "the blue lamp"}
    results = {}
    batches = endpoint.engine_batches
    threads = [threading.Thread(target=lambda n=n, t=t: results.__setitem__(n, play(endpoint, n, t))) for n, t in tasks.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, task in tasks.items():
        other = next(v for k, v in tasks.items() if k != name)
        sent, turns = results[name]
        assert len(turns) == 3
        for messages, turn in zip(sent, turns):
            text = tokenizer.decode(turn.prompt_ids)
            assert task in text and other not in text
            assert turn.prompt_ids == chat_ids(tokenizer, messages)
    # Both episodes open: each call waits for the other's, one engine batch per round.
    assert endpoint.engine_batches - batches == 3


def test_a_call_samples_the_same_whichever_calls_share_its_batch(endpoint):
    messages = [{"role": "user", "content": "Go north."}]
    alone = chat(client(endpoint.open_episode("seeded")), messages)
    endpoint.close_episode("seeded")
    other = client(endpoint.open_episode("other"))
    again = client(endpoint.open_episode("seeded"))
    answers, batches = {}, endpoint.engine_batches
    threads = [threading.Thread(target=lambda: answers.__setitem__("o", chat(other, [{"role": "user", "content": "Hi"}]))),
               threading.Thread(target=lambda: answers.__setitem__("s", chat(again, messages)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    endpoint.close_episode("seeded"), endpoint.close_episode("other")
    assert endpoint.engine_batches - batches == 1  # the two calls did share a batch
    assert answers["s"] == alone


def test_the_agent_reads_the_text_without_the_end_of_turn_token_or_the_stop_string(endpoint, tiny_model):
    tokenizer, _ = tiny_model
    ids = tokenizer.encode("go to desk 1</action>", add_special_tokens=False)
    sampled = Completion([*ids, tokenizer.eos_token_id], [0.0] * (len(ids) + 1), None, "eos")
    assert endpoint.content(sampled, ()) == "go to desk 1</action>"
    assert endpoint.content(sampled, ("</action>",)) == "go to desk 1"


#: A chat template that tags tool calls, as Qwen2.5's and Hermes' do (shortened).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "look", "description": "Look at a thing.",
                                           "parameters": {"type": "object", "properties": {"at": {"type": "string"}}}}}]


class ReplyEngine:
    """An engine that samples one given reply (with log-prob 0): what a model that learnt its
    template's tool markup writes."""

    weights_version = 0

    def __init__(self, tokenizer, reply: str) -> None:
        self.ids = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]

    def generate(self, prompts, params, choices=None, seeds=None):
        return [Completion(list(self.ids), [0.0] * len(self.ids), None, "eos") for _ in prompts]


def test_tool_calls_in_the_templates_markup_come_back_as_tool_calls_and_go_back_as_written(tiny_model):
    tokenizer = copy.deepcopy(tiny_model[0])
    tokenizer.chat_template = TOOL_TEMPLATE
    written = '<tool_call>\n{"name": "look", "arguments": {"at": "lamp"}}\n</tool_call>'
    with ChatEndpoint(ReplyEngine(tokenizer, f"Let me see.{written}"), tokenizer, TOKEN, max_new_tokens=64) as ep:
        c = client(ep.open_episode("tools"))
        messages = [{"role": "user", "content": "What is on the desk?"}]
        reply = c.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me see."
        (call,) = choice.message.tool_calls
        assert call.function.name == "look" and json.loads(call.function.arguments) == {"at": "lamp"}
        # The agent sends the call back in OpenAI's shape (arguments as a JSON string) with the
        # tool's answer: the template renders the call as the model wrote it.
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "a lamp"}]
        c.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
        assert chat(c, [{"role": "user", "content": "no tools offered"}]) == f"Let me see.{written}"
        first, second, _ = ep.close_episode("tools")
    assert written in tokenizer.decode(second.prompt_ids)
    assert first.response_ids[:-1] == tokenizer.encode(f"Let me see.{written}", add_special_tokens=False)
    assert second.prompt_ids[: len(first.prompt_ids)] == first.prompt_ids


@pytest.mark.parametrize("text", ['<tool_call>{"name": "look", "arguments": </tool_call>',
                                  '<tool_call>["look"]</tool_call>', "no call at all"])
def test_a_reply_without_a_well_formed_call_is_left_whole_as_text(text):
    assert read_tool_calls(text, "call-0") == (text, [])


def test_an_episode_over_its_call_cap_is_answered_429(tiny_model):
    tokenizer, model = tiny_model
    with ChatEndpoint(HFEngine(model, tokenizer, seed=0), tokenizer, TOKEN, max_new_tokens=4, max_calls=2) as ep:
        c = client(ep.open_episode("capped"))
        for _ in range(2):
            chat(c, [{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError, match="made 2 calls"):
            chat(c, [{"role": "user", "content": "hi"}])
        assert len(ep.close_episode("capped")) == 2


def test_an_engine_failure_answers_503_to_this_call_and_every_later_one(tiny_model):
    tokenizer, _ = tiny_model
    with ChatEndpoint(DeadEngine(), tokenizer, TOKEN) as ep:
        c = client(ep.open_episode("doomed"))
        for _ in range(2):
            with pytest.raises(openai.InternalServerError, match="engine core died"):
                chat(c, [{"role": "user", "content": "hi"}])
        assert isinstance(ep.engine_error, RuntimeError)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"temperature": 1.3}, "'temperature'"),
        ({"max_tokens": 500}, "'max_tokens'"),
        ({"n": 2}, "'n'"),
        ({"top_p": 0.9}, "'top_p'"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "'stop'"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "'messages[0].role'"),
        ({"messages": [{"role": "user", "content": 3}]}, "'messages[0].content'"),
        ({"messages": []}, "'messages'"),
    ],
)
def test_a_malformed_request_is_answered_400_naming_the_field(endpoint, kwargs, named):
    c = client(endpoint.open_episode("malformed"))
    request = {"model": "policy", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError, match=re.escape(named)):
        c.chat.completions.create(**request)
    assert endpoint.close_episode("malformed") == []


def test_requests_without_the_token_or_to_an_unknown_episode_are_refused(endpoint):
    base_url = endpoint.open_episode("guarded")
    with pytest.raises(openai.AuthenticationError):
        chat(client(base_url, token="not-the-token-at-all"), [{"role": "user", "content": "hi"}])
    request = urllib.request.Request(f"{base_url}/chat/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 401
    assert endpoint.close_episode("guarded") == []  # nothing sampled for either
    with pytest.raises(openai.NotFoundError, match="guarded"):
        chat(client(base_url), [{"role": "user", "content": "hi"}])


def test_an_oversized_body_is_refused_before_it_is_read(endpoint):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}).encode()
    request = urllib.request.Request(f"{endpoint.open_episode('large')}/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413
    endpoint.close_episode("large")


def test_the_endpoint_binds_this_machine_and_wants_a_real_token(tiny_model):
    tokenizer, model = tiny_model
    with pytest.raises(ValueError, match="16 characters"):
        ChatEndpoint(HFEngine(model, tokenizer), tokenizer, "short")
    ep = ChatEndpoint(HFEngine(model, tokenizer), tokenizer, TOKEN)
    try:
        assert ep.url.startswith("http://127.0.0.1:")
    finally:
        ep.close()
