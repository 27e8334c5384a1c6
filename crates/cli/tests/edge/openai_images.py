"""Draws an image through `lsplit edge` with the real `openai` client, tries the requests the
server must refuse, and prints what it got as one JSON object.

Usage: openai_images.py BASE_URL MODEL PROMPT NEGATIVE SIZE STEPS SEED
The Rust test (crates/cli/tests/edge.rs) compares the PNG with `lsplit image`'s.
"""

import json
import sys

import openai

base_url, model, prompt, negative, size, steps, seed = sys.argv[1:8]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused-on-loopback", max_retries=0)
# lsplit's extensions travel as extra JSON fields.
extensions = {"negative_prompt": negative, "steps": int(steps), "seed": int(seed)}
out = {"models": [m.id for m in client.models.list().data]}

image = client.images.generate(
    model=model, prompt=prompt, n=1, size=size, response_format="b64_json", extra_body=extensions
)
out["image"] = {
    "created": image.created,
    "count": len(image.data),
    "b64_json": image.data[0].b64_json,
    "url": image.data[0].url,
    "lsplit": image.model_dump().get("lsplit"),
}

errors = {}
for name, call in {
    "n": lambda: client.images.generate(model=model, prompt=prompt, n=2, size=size, extra_body=extensions),
    "size": lambda: client.images.generate(model=model, prompt=prompt, size="65x64", extra_body=extensions),
    "size_text": lambda: client.images.generate(model=model, prompt=prompt, size="large", extra_body=extensions),
    "url": lambda: client.images.generate(model=model, prompt=prompt, size=size, response_format="url",
                                          extra_body=extensions),
    "steps": lambda: client.images.generate(model=model, prompt=prompt, size=size,
                                            extra_body=dict(extensions, steps=5000)),
    "model": lambda: client.images.generate(model="dall-e-3", prompt=prompt, size=size, extra_body=extensions),
}.items():
    try:
        call()
        errors[name] = {"status": 200}
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "body": e.body}
out["errors"] = errors

print(json.dumps(out))
