"""A base model is offered for raw completions only: a chat request for it is refused with 400 naming
/v1/completions, before placement (no ticket, no charge); /v1/completions serves it; /v1/models says what each
model is for.

The HTTP API runs in-process (the real FastAPI app over ASGI, a real gateway with its libp2p host and SQLite
database); the providers run the echo engine on the catalog entries they offer.
"""

from __future__ import annotations

import hashlib

import httpx
import pytest

from llorch.gateway.api.http_api import build_app
from llorch.inference import catalog
from llorch.inference.echo import EchoEngine
from llorch.inference.engine import Sampling
from llorch.inference.errors import RequestError
from tests.helpers import MODEL_ID
from tests.inprocess import market

BASE_MODEL = "gemma-3-270m-q4_k_m"
API_KEY = "sk-llorch-test-model-kinds"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway/v1",
                             headers={"Authorization": f"Bearer {API_KEY}"})


def bootstrap_key() -> dict:
    return {"api_key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}


async def tickets(built) -> int:
    return (await built.rows("SELECT COUNT(*) FROM tickets"))[0][0]


async def test_chat_on_a_base_model_is_refused_with_the_way_to_use_it(tmp_path):
    async with market(tmp_path, {"base": {"model": BASE_MODEL}, "chat": {}}, gateway_options=bootstrap_key()) as built:
        async with client(build_app(built.gateway)) as http:
            for stream in (False, True):
                refused = await http.post("/chat/completions", json={"model": BASE_MODEL, "messages": MESSAGES,
                                                                     "stream": stream})
                assert refused.status_code == 400, refused.text
                error = refused.json()["error"]
                assert error["param"] == "model" and error["code"] == "invalid_request"
                assert "base model" in error["message"] and "/v1/completions" in error["message"], error
                assert MODEL_ID in error["message"], "the refusal names a model that does serve chat"
            assert await tickets(built) == 0                    # refused before placement: nothing issued

            completed = await http.post("/completions", json={"model": BASE_MODEL, "max_tokens": 3, "seed": 1,
                                                              "prompt": "The capital of France is"})
            assert completed.status_code == 200, completed.text
            body = completed.json()
            assert body["object"] == "text_completion" and body["choices"][0]["text"]
            assert body["llorch"]["provider"] == built.providers["base"].key.peer_id

            chat = await http.post("/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES,
                                                              "max_tokens": 3})
            assert chat.status_code == 200, chat.text
            assert await tickets(built) == 2


async def test_v1_models_says_what_each_model_is_for(tmp_path):
    async with market(tmp_path, {"base": {"model": BASE_MODEL}, "chat": {}}, gateway_options=bootstrap_key()) as built:
        async with client(build_app(built.gateway)) as http:
            listed = await http.get("/models")
    assert listed.status_code == 200
    kinds = {model["id"]: model["kind"] for model in listed.json()["data"]}
    assert kinds == {MODEL_ID: "instruct", BASE_MODEL: "base"}


async def test_a_provider_refuses_a_chat_prompt_for_a_base_model_itself():
    """Defence in depth: a node serving a base model refuses a chat prompt (bad_request, before any work) even if
    whoever sent the ticket did not check."""
    engine = EchoEngine(catalog.lookup(BASE_MODEL))
    sampling = Sampling(1, 0, 1_000_000, 4)
    with pytest.raises(RequestError, match="/v1/completions"):
        engine.prepare({"messages": MESSAGES}, sampling)
    assert engine.prepare({"text": "The capital of France is"}, sampling).prompt_tokens
