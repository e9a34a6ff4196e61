"""The peer to beat: a minimal OpenAI-to-Poe bridge of the kind this project replaces.

    python bench/bridge.py POE_BASE_URL POE_KEY PORT

FastAPI + fastapi-poe's get_final_response / get_bot_response with one shared session, no
interception, no checks: the shape of the earlier Poe bridges. bench/run.py runs it as a peer.
"""

import json
import sys
import time
import uuid
from collections.abc import AsyncIterator

import fastapi_poe as fp
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

BASE_URL, KEY, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = FastAPI()
session = httpx.AsyncClient(timeout=600, trust_env=False, limits=httpx.Limits(max_connections=None))


@app.post("/v1/chat/completions")
async def chat(request: Request) -> object:
    body = await request.json()
    model, msgs = body["model"], body["messages"]
    roles = {"assistant": "bot", "system": "system"}
    query = [
        fp.ProtocolMessage(role=roles.get(m["role"], "user"), content=m["content"]) for m in msgs
    ]
    args = {
        "messages": query,
        "bot_name": model,
        "api_key": KEY,
        "session": session,
        "base_url": BASE_URL,
    }
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        c = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(c, separators=(',', ':'))}\n\n"

    if body.get("stream"):

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            async for partial in fp.get_bot_response(**args):
                yield chunk({"content": partial.text})
            yield chunk({}, "stop") + "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    request_ = fp.QueryRequest(
        query=query, user_id="", conversation_id="", message_id="", version="1.0", type="query"
    )
    text = await fp.get_final_response(
        request_, model, KEY, session=session, base_url=BASE_URL, num_tries=1
    )
    message = {"role": "assistant", "content": text}
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
    )


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
