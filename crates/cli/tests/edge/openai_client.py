"""Drives `lsplit edge` with the real `openai` client and prints what it got as one JSON object.

Usage: openai_client.py BASE_URL CHAT_PROMPT RAW_PROMPT STOP
The Rust test (crates/cli/tests/edge.rs) compares the texts with `lsplit generate`'s.
"""

import json
import sys

import openai

base_url, chat_prompt, raw_prompt, stop = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused-on-loopback", max_retries=0)
sampling = dict(max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
messages = [{"role": "user", "content": chat_prompt}]
out = {}

models = client.models.list()
out["models"] = [m.id for m in models.data]
model = out["models"][0]

chat = client.chat.completions.create(model=model, messages=messages, **sampling)
out["chat"] = {
    "text": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump(),
    "object": chat.object,
}

pieces, finish, usage, roles = [], None, None, []
for chunk in client.chat.completions.create(
    model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **sampling
):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["chat_stream"] = {"pieces": pieces, "finish_reason": finish, "usage": usage, "roles": roles}

stopped = client.chat.completions.create(model=model, messages=messages, stop=[stop], **sampling)
out["chat_stop"] = {"text": stopped.choices[0].message.content, "finish_reason": stopped.choices[0].finish_reason}

stopped_pieces = []
for chunk in client.chat.completions.create(
    model=model, messages=messages, stop=stop, stream=True, **sampling
):
    for choice in chunk.choices:
        if choice.delta.content:
            stopped_pieces.append(choice.delta.content)
out["chat_stop_stream"] = "".join(stopped_pieces)

completion = client.completions.create(model=model, prompt=raw_prompt, **sampling)
out["completion"] = {
    "text": completion.choices[0].text,
    "finish_reason": completion.choices[0].finish_reason,
    "usage": completion.usage.model_dump(),
}
out["completion_stream"] = "".join(
    choice.text
    for chunk in client.completions.create(model=model, prompt=raw_prompt, stream=True, **sampling)
    for choice in chunk.choices
)

errors = {}
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
except openai.NotFoundError as e:
    errors["unknown_model"] = {"status": e.status_code, "body": e.body}
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=100000)
except openai.BadRequestError as e:
    errors["too_long"] = {"status": e.status_code, "body": e.body}
try:
    client.images.generate(prompt="a lighthouse at dusk", response_format="b64_json")
except openai.NotFoundError as e:
    errors["images"] = {"status": e.status_code, "body": e.body}
out["errors"] = errors

print(json.dumps(out))
