"""Lone surrogate escapes (a JavaScript client that cut a string inside an emoji) over stdio and HTTP:
the request is answered, with U+FFFD in place of the half character, and the server keeps serving."""

from __future__ import annotations

import json

import httpx2
import pytest

from flux_mcp.surrogates import repair_surrogates
from tests.conftest import ATLAS_KEY
from tests.subprocess_helpers import child_env, http_server
from tests.test_adversarial_process import INIT, RawStdio

pytestmark = [pytest.mark.anyio]
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
# Each prompt as a client's JSON text spells it, and what the provider must receive.
VARIANTS = [
    (r"a cat \ud83d", "a cat \ufffd"),  # a high surrogate at the end (the usual cut)
    (r"\ud83d a cat", "\ufffd a cat"),  # a high surrogate followed by plain text
    (r"a \ude00 cat", "a \ufffd cat"),  # a low surrogate alone
    (r"a \ude00\ud83d cat", "a \ufffd\ufffd cat"),  # a pair in the wrong order
    (r"a \ud83d\ud83d\ude00 cat", "a \ufffd\U0001f600 cat"),  # a lone high one, then a whole pair
]


def call(request_id: int, prompt_json: str) -> str:
    """A tools/call line with the prompt spliced in as JSON text (json.dumps would re-escape it)."""
    return (f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "tools/call", "params": {{"name": '
            f'"generate_image", "arguments": {{"prompt": "{prompt_json}"}}}}}}')


@pytest.fixture
def fake(loopback_fake):
    return loopback_fake


@pytest.fixture
def env(fake, home):
    return child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url)


def test_repair_replaces_only_lone_surrogate_escapes():
    assert repair_surrogates(rb'{"a": "x\ud83d"}') == rb'{"a": "x\ufffd"}'
    assert repair_surrogates(rb'{"a": "\ud83d\ude00"}') is None  # a whole pair is text
    assert repair_surrogates(rb'{"a": "\\ud83d"}') is None  # an escaped backslash, then letters
    assert repair_surrogates(rb'{"a": "\\\ud83d"}') == rb'{"a": "\\\ufffd"}'
    assert repair_surrogates(rb'{"\udc00": 1}') == rb'{"\ufffd": 1}'  # keys too
    assert repair_surrogates(rb'{"a": "\u00e9"}') is None


@pytest.mark.subprocess
def test_lone_surrogates_in_a_stdio_call_are_answered_and_the_server_keeps_serving(env, fake, workspace):
    with RawStdio(env, workspace) as raw:
        raw.send(INIT)
        raw.answer(0)
        raw.send(INITIALIZED)
        answers = []
        for i, (prompt, _) in enumerate(VARIANTS, 1):
            raw.send(call(i, prompt))
            answers.append(raw.answer(i))
        raw.send({"jsonrpc": "2.0", "id": 99, "method": "ping"})
        pong = raw.answer(99)
        stderr = raw.close()
    for answer in answers:
        assert answer["result"]["structuredContent"]["status"] == "succeeded", answer
    assert [job["prompt"] for job in fake.ledger] == [sent for _, sent in VARIANTS]
    assert pong["result"] == {}
    assert "Traceback" not in stderr


def _message(response: httpx2.Response) -> dict:
    """The JSON-RPC message of a streamable-HTTP answer (a JSON body, or the first SSE data line)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads(next(d for d in data if d))


@pytest.mark.subprocess
async def test_lone_surrogates_in_an_http_call_are_answered_and_the_server_keeps_serving(env, fake, workspace):
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with http_server("streamable-http", env, workspace) as (url, _):
        async with httpx2.AsyncClient(timeout=30, headers=headers) as http:
            opened = await http.post(f"{url}/mcp", content=json.dumps(INIT))
            session = {"mcp-session-id": opened.headers["mcp-session-id"],
                       "mcp-protocol-version": INIT["params"]["protocolVersion"]}
            await http.post(f"{url}/mcp", headers=session, content=json.dumps(INITIALIZED))
            answers = [await http.post(f"{url}/mcp", headers=session, content=call(i, prompt))
                       for i, (prompt, _) in enumerate(VARIANTS, 1)]
            pong = await http.post(f"{url}/mcp", headers=session,
                                   content=json.dumps({"jsonrpc": "2.0", "id": 99, "method": "ping"}))
    for i, answer in enumerate(answers, 1):
        assert answer.status_code == 200, answer.text
        message = _message(answer)
        assert message["id"] == i and message["result"]["structuredContent"]["status"] == "succeeded"
    assert [job["prompt"] for job in fake.ledger] == [sent for _, sent in VARIANTS]
    assert _message(pong)["result"] == {}


@pytest.mark.subprocess
def test_lone_surrogates_are_answered_on_the_sdk_stdio_transport_too(home, workspace):
    """Standard input from a file (not a pipe) is read by the SDK's own stdio transport."""
    import subprocess

    from tests.subprocess_helpers import flux_command

    requests = workspace / "requests.jsonl"
    requests.write_text("\n".join([json.dumps(INIT), json.dumps(INITIALIZED), call(1, VARIANTS[0][0])]) + "\n")
    with requests.open("rb") as stdin:  # no provider key: the offline placeholder draws the image
        done = subprocess.run(flux_command(), env=child_env(home), cwd=workspace, stdin=stdin,
                              capture_output=True, timeout=120, check=False)
    answers = {m.get("id"): m for m in map(json.loads, done.stdout.decode().splitlines())}
    assert answers[1]["result"]["structuredContent"]["status"] == "succeeded", answers
    assert None not in answers  # no message went unanswered with a null id
