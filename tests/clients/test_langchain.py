"""LangChain's OpenAI chat model (langchain-openai) against the real server and model, as agent
frameworks drive it: a plain call, a stream, and a tool call whose arguments fit the tool's schema.
Greedy answers equal the openai client's: LangChain adds nothing of its own to the request."""

from __future__ import annotations

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = "Name a colour."


@pytest.fixture(scope="module")
def llm(server):
    return ChatOpenAI(base_url=server.url + "/v1", api_key="x", model="x", temperature=0, max_tokens=12,
                      max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def test_invoke_and_stream_equal_the_openai_client(llm, oai):
    reply = llm.invoke(ASK)
    chat = oai.chat.completions.create(model="x", temperature=0, max_tokens=12,
                                       messages=[{"role": "user", "content": ASK}])
    assert reply.content == chat.choices[0].message.content and reply.content
    assert reply.usage_metadata["input_tokens"] == chat.usage.prompt_tokens
    assert reply.usage_metadata["output_tokens"] == chat.usage.completion_tokens
    assert "".join(chunk.content for chunk in llm.stream(ASK)) == reply.content


def test_bound_tool_gets_arguments_that_fit_its_schema(llm):
    agent = llm.model_copy(update={"max_tokens": 64}).bind_tools([WEATHER], tool_choice="get_weather")
    reply = agent.invoke("What is the weather in Paris?")
    assert len(reply.tool_calls) == 1, reply
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
