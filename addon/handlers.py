"""The endpoints: each turns one OpenAI request into Poe queries and writes the answer back in
its own wire format (JSON, or an SSE stream that follows Poe event by event)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from fastapi_poe.types import ProtocolMessage, QueryRequest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from addon import chat, completions, images, responses
from addon.config import fingerprint
from addon.errors import (
    NO_RETRY,
    OpenAIError,
    PoeFailure,
    bad_request,
    classify_failure,
    not_found,
)
from addon.keys import DEFAULT_COOLDOWN_S, OUT_OF_POINTS_COOLDOWN_S, retry_after_seconds
from addon.pacing import with_ticks
from addon.poe import PoeError
from addon.runner import Piece, ReplyRunner, merge
from addon.service import SSE_DONE, Auth, Service, TextEvents, new_id, sse
from addon.state import Unavailable, store_unavailable
from addon.tokens import TokenCounter, estimate

T = TypeVar("T")

logger = logging.getLogger(__name__)

MODEL_CREATED = 1_700_000_000  # a fixed date: Poe does not say when a bot was made
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, middleboxes see traffic


class AnswerJSON(JSONResponse):
    """A JSON answer in ASCII, as the stream's events are: a bot's text may hold a lone
    surrogate (an emoji cut in two by a bot that streams UTF-16), which UTF-8 cannot encode
    and Starlette's JSONResponse would turn into a 500 after Poe answered. Escaped, the
    client's JSON parser joins the halves again."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def runner_limits(service: Service, bot: str) -> dict[str, Any]:
    return {"timeouts": service.settings.timeouts, "bot": bot}


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "poe"}


async def list_models(service: Service, request: Request) -> Response:
    service.authenticate(request)  # listing spends nothing: no Poe key is picked
    data = [model_object(name) for name in service.model_map.names()]
    return JSONResponse({"object": "list", "data": data})


async def get_model(service: Service, request: Request) -> Response:
    service.authenticate(request)
    name = request.path_params["model"]
    if not service.model_map.is_mapped(name):
        raise not_found(
            f"The model `{name}` is neither in this proxy's model map nor among the bots Poe "
            "publishes (as far as the proxy learned them). Chat requests still send unknown "
            f"names to Poe as bot names, so `{name}` works if Poe has a bot of that name.",
            "model_not_found",
        )
    return JSONResponse(model_object(name))


# --- shared machinery ------------------------------------------------------------------------


# Texts longer than this are counted in a thread (the tokenizer releases the GIL): about 10 ms
# of counting on the event loop at most.
OFF_LOOP_CHARS = 50_000


def _chars(prompts: list[str], answers: list[str]) -> int:
    return sum(map(len, prompts)) + sum(map(len, answers))


class Call:
    """One client request in flight: its key, its Poe queries, its label for the log."""

    def __init__(
        self, service: Service, auth: Auth, model: str, bot: str, request: Request
    ) -> None:
        self.service = service
        self.auth = auth
        self.model = model
        self.bot = bot
        self.started = time.monotonic()
        # What mitmproxy shows about this flow (comment, Poe query view): see poe_openai.py.
        self.info: dict[str, Any] = {"bot": bot, "key": fingerprint(auth.poe_key)}
        flow_id = service.flow_id(request)
        if flow_id:
            service.flow_info[flow_id] = self.info
        self.runners: list[ReplyRunner] = []
        self._starting: list[asyncio.Task[ReplyRunner]] = []
        self.counter = TokenCounter(model)
        self._usage: dict[str, int] | None = None
        self._completion_tokens: int | None = None

    @property
    def label(self) -> str:
        """For the log: the model, the bot and the key that answers (after a failover, the
        key that took over, not the one that failed)."""
        return self.label_for(None)

    def label_for(self, key: str | None) -> str:
        tag = self.info["key"] if key is None else fingerprint(key)
        return f"{self.model}->{self.bot} {tag}"

    def classify(self, e: PoeError, key: str | None = None) -> OpenAIError:
        key = self.auth.poe_key if key is None else key
        tag = "" if self.auth.client_key else fingerprint(key)
        return classify_failure(e.failure, client_key=self.auth.client_key, key_tag=tag)

    def failure(self, e: PoeError, when: str, key: str | None = None) -> OpenAIError:
        return self.failed(self.classify(e, key), when, key)

    def failed(self, err: OpenAIError, when: str, key: str | None = None) -> OpenAIError:
        self.info["error"] = f"{err.status} {err.code}: {err.message}"
        if when == "mid-stream":  # the others are counted with their HTTP status
            self.service.stats[f"stream error {err.code}"] += 1
        logger.info("poe-openai: %s failed %s: %s", self.label_for(key), when, err)
        return err

    def safely(self, step: str, work: Callable[[], T], fallback: Callable[[], T]) -> T:
        """A step of the proxy's own that the answer does not need (counting, the flow's view,
        the response store): the client pays Poe for the answer, so a failure here is logged
        in one line and never loses it."""
        try:
            return work()
        except Exception as e:
            self.step_failed(step, e)
            return fallback()

    def step_failed(self, step: str, e: Exception) -> None:
        logger.warning(
            "poe-openai: %s: %s failed (%s: %s); the answer goes to the client anyway",
            self.label,
            step,
            type(e).__name__,
            str(e)[:200],
        )

    def usage(self, prompts: list[str], answers: list[str], *, chat_format: bool) -> dict[str, int]:
        """The usage the client gets, counted once; the flow's comment shows the same count."""
        if self._usage is None:
            counter = self.counter

            def prompt_tokens() -> int:
                if chat_format:
                    return counter.messages(prompts)
                return sum(counter.count(p) for p in prompts)

            prompt = self.safely(
                "counting tokens", prompt_tokens, lambda: sum(estimate(p) for p in prompts)
            )
            self._usage = chat.usage(prompt, self.completion_tokens(answers))
        return self._usage

    async def counted_usage(
        self, prompts: list[str], answers: list[str], *, chat_format: bool
    ) -> dict[str, int]:
        """``usage``, counted in a thread when the texts are long: a megabyte takes about half
        a second, which on the event loop would stall every other answer meanwhile."""
        if self._usage is None and _chars(prompts, answers) > OFF_LOOP_CHARS:
            await asyncio.to_thread(self.usage, prompts, answers, chat_format=chat_format)
        return self.usage(prompts, answers, chat_format=chat_format)

    async def counted_answers(self, answers: list[str]) -> None:
        """The answer's tokens for the flow's comment, off the loop when the answer is long."""
        if self._completion_tokens is None and _chars([], answers) > OFF_LOOP_CHARS:
            await asyncio.to_thread(self.completion_tokens, answers)

    def completion_tokens(self, answers: list[str]) -> int:
        if self._completion_tokens is None:
            self._completion_tokens = self.safely(
                "counting tokens",
                lambda: sum(self.counter.count(a) for a in answers),
                lambda: sum(estimate(a) for a in answers),
            )
            self.info["completion_tokens"] = self._completion_tokens
        return self._completion_tokens

    def done(self, how: str, answers: list[str] | None = None) -> None:
        ms = (time.monotonic() - self.started) * 1000
        self.info["total_ms"] = round(ms)
        if answers is not None:
            self.completion_tokens(answers)  # the usage's figure, when the client got usage
        logger.info("poe-openai: %s %s in %.0f ms", self.label, how, ms)

    async def _key_trouble(self, key: str, failure: PoeFailure, err: OpenAIError) -> bool:
        """Note what Poe said about a configured key; True if another key may do better."""
        pool = self.service.pool
        if err.code == "rate_limit_exceeded":
            if failure.status == 429:  # the key's own limit (an in-band one may be the bot's)
                wait = retry_after_seconds(failure.retry_after) or DEFAULT_COOLDOWN_S
                await pool.cool(key, wait, "rate-limited")
        elif err.code == "insufficient_quota":
            if failure.status == 402:  # the account's points (an in-band one may be the bot's)
                await pool.cool(key, OUT_OF_POINTS_COOLDOWN_S, "out of points")
        elif err.code == "poe_key_rejected":
            await pool.reject(key)
        else:
            return False
        return True

    async def _start_one(
        self, query: QueryRequest, make: Callable[[Any], ReplyRunner]
    ) -> ReplyRunner:
        """Begin one choice; on a key problem, move to the next configured key, which is
        safe because nothing has reached the client yet."""
        key, tried = self.auth.poe_key, set[str]()
        while True:
            runner = make(self.service.poe.stream(query, self.bot, key))
            runner.key = key
            try:
                await runner.first()
                # Poe's first event, status text included (the answer may begin later)
                first = runner.first_event_at or time.monotonic()
                self.info.setdefault("first_event_ms", round((first - self.started) * 1000))
                self.info["key"] = fingerprint(key)
                return runner
            except PoeError as e:
                await runner.aclose()
                err = self.classify(e, key)
                if self.auth.client_key or not await self._key_trouble(key, e.failure, err):
                    raise self.failure(e, "before answering", key) from None
                tried.add(key)
                following = await self.service.pool.pick(exclude=tried)
                if following is None:
                    # Nothing to fail over to, or every key failed in a way that need not
                    # concern the key (an in-band limit of this bot): Poe's own answer.
                    if len(tried) == 1 or self.service.pool.any_usable():
                        raise self.failure(e, "before answering", key) from None
                    logger.info("poe-openai: %s: no Poe key left", self.label_for(key))
                    raise self.service.pool.exhausted() from None
                logger.info(
                    "poe-openai: %s: %s, trying %s",
                    self.label_for(key),
                    err.code,
                    fingerprint(following),
                )
                key = following

    async def start(
        self,
        queries: list[QueryRequest],
        make: Callable[[int, Any], ReplyRunner],
        stream: bool,
    ) -> None:
        """One Poe query per choice. The status is decided by their first events; a stream
        waits for them at most poe_header_hold_s, then commits 200 and keeps waiting."""
        self._starting = [
            asyncio.create_task(self._start_one(q, lambda events, i=i: make(i, events)))
            for i, q in enumerate(queries)
        ]
        # for the flow's view; made while the queries are on their way, not before (and
        # never at the cost of the answer they will bring)
        self.info["poe_query"] = self.safely(
            "describing the Poe query",
            lambda: queries[0].model_dump(mode="json", exclude_defaults=True),
            dict,
        )
        hold = self.service.settings.timeouts.header_hold if stream else None
        try:
            done, pending = await asyncio.wait(
                self._starting, timeout=hold, return_when=asyncio.FIRST_EXCEPTION
            )
        except BaseException:  # cancelled: the client left; the queries go too
            await self.close()
            raise
        failed = [t for t in done if t.exception() is not None]
        if failed:
            await self.close()
            raise failed[0].exception()  # type: ignore[misc]
        if not pending:
            self.runners = [t.result() for t in self._starting]

    async def _started(self) -> list[ReplyRunner]:
        if not self.runners:
            self.runners = list(await asyncio.gather(*self._starting))
        return self.runners

    async def close(self) -> None:
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        for task in self._starting:
            if not task.cancelled() and task.exception() is None:
                await task.result().aclose()

    async def collect(self) -> None:
        try:
            async for _ in merge(await self._started()):
                pass
        except PoeError as e:
            raise self.failure(e, "while answering") from None

    def stream(
        self, request: Request, body: Callable[[], AsyncIterator[bytes]]
    ) -> StreamingResponse:
        flow_id = self.service.flow_id(request)

        async def tracked() -> AsyncIterator[bytes]:
            self.service.track(flow_id)
            try:
                async for chunk in body():
                    yield chunk
            finally:
                self.service.untrack(flow_id)
                await self.close()

        return StreamingResponse(tracked(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _pieces(self) -> AsyncIterator[Piece | OpenAIError]:
        try:
            async for piece in merge(await self._started()):
                yield piece
        except PoeError as e:
            yield self.failure(e, "mid-stream")
        except OpenAIError as e:
            yield e

    async def pieces(self) -> AsyncIterator[Piece | OpenAIError | None]:
        """The stream's pieces, None for a keep-alive while Poe is silent, and a failure after
        streaming began as an OpenAIError, last."""
        async for item in with_ticks(self._pieces(), self.service.settings.timeouts.keepalive):
            yield item


async def attach(
    service: Service, req: chat.ChatRequest, query: QueryRequest, auth: Auth
) -> QueryRequest:
    """Upload the request's pictures and files (once each) and put them on the query."""
    if not req.files:
        return query
    index_of = [i for i, files in req.files.items() for _ in files]
    uploads = [f for files in req.files.values() for f in files]
    attachments = await asyncio.gather(*(service.poe.upload(f, auth.poe_key) for f in uploads))
    by_message: dict[int, list[Any]] = {}
    for i, attachment in zip(index_of, attachments, strict=True):
        by_message.setdefault(i, []).append(attachment)
    return chat.with_attachments(query, by_message)


def one_query_per_choice(query: QueryRequest, n: int) -> list[QueryRequest]:
    """Each choice is a query of its own, with its own ids (the same ids n times would be one
    conversation to Poe, answered n times over)."""
    return [query] + [
        query.model_copy(update={"message_id": new_id(), "conversation_id": new_id()})
        for _ in range(n - 1)
    ]


# --- chat completions ------------------------------------------------------------------------


async def chat_completions(service: Service, request: Request) -> Response:
    auth = service.authenticate(request)
    req = chat.parse_chat_request(
        await service.json(request), service.model_map, service.settings.max_file_bytes
    )
    auth = await service.pick_key(auth)  # judged first: a bad request spends no key
    call = Call(service, auth, req.model, req.bot, request)
    counter = call.counter
    try:
        query = await attach(service, req, chat.to_query(req, new_id), auth)
    except PoeError as e:
        raise call.failure(e, "uploading") from None
    sampling = req.sampling
    queries = one_query_per_choice(query, sampling.n)

    def make(index: int, events: Any) -> ReplyRunner:
        return ReplyRunner(
            index,
            events,
            counter,
            parallel_tool_calls=req.parallel_tool_calls,
            stop=sampling.stop,
            max_tokens=sampling.max_tokens,
            json_mode=req.json_mode,
            json_schema=req.json_schema,
            **runner_limits(service, req.bot),
        )

    await call.start(queries, make, sampling.stream)
    completion_id = "chatcmpl-" + new_id()[:24]
    created = int(time.time())

    async def usage(answers: list[str]) -> dict[str, int]:  # counted when written
        return await call.counted_usage([m.content for m in query.query], answers, chat_format=True)

    if not sampling.stream:
        await call.collect()
        choices = [
            chat.Choice(r.final_text, r.finish_reason or "stop", r.tool_calls) for r in call.runners
        ]
        answered = await usage([c.text for c in choices])
        call.done("answered")
        return AnswerJSON(chat.completion(completion_id, created, req.model, choices, answered))

    chunks = chat.ChunkFactory(completion_id, created, req.model, sampling.include_usage)
    content = [TextEvents(partial(chunks.content, index=i)) for i in range(sampling.n)]

    async def body() -> AsyncIterator[bytes]:
        # Writes are joined where nothing would wait between them: the role chunks go out
        # with the first piece, the last finish with usage and [DONE]. Each Poe event is still
        # written the moment it arrives; fewer writes is less work on both loopback ends.
        held = b"".join(sse(chunks.role(index)) for index in range(sampling.n))
        unfinished = sampling.n
        async for piece in call.pieces():
            if piece is None:
                yield held + KEEPALIVE
                held = b""
                continue
            if isinstance(piece, OpenAIError):
                yield held + sse(piece.body())
                return
            out = [held]
            if piece.text:
                out.append(content[piece.index](piece.text))
            if piece.tool_calls:
                out.append(sse(chunks.tool_calls(piece.tool_calls, piece.index)))
            if piece.finish:
                out.append(sse(chunks.finish(piece.finish, piece.index)))
                unfinished -= 1
            held = b"".join(out)
            if unfinished:  # after the last finish, the end follows at once
                yield held
                held = b""
        tail = [held]
        if sampling.include_usage:
            tail.append(sse(chunks.usage(await usage([r.text for r in call.runners]))))
        tail.append(SSE_DONE)
        yield b"".join(tail)
        await call.counted_answers([r.text for r in call.runners])
        call.done("streamed", [r.text for r in call.runners])

    return call.stream(request, body)


# --- legacy completions ----------------------------------------------------------------------


async def legacy_completions(service: Service, request: Request) -> Response:
    auth = service.authenticate(request)
    req = completions.parse_completion_request(await service.json(request), service.model_map)
    auth = await service.pick_key(auth)
    call = Call(service, auth, req.model, req.bot, request)
    counter = call.counter
    sampling = req.sampling
    conversations = req.conversations()
    queries = [
        chat.to_query(chat.ChatRequest(req.model, req.bot, list(c), sampling=sampling), new_id)
        for c in conversations
    ]

    def make(index: int, events: Any) -> ReplyRunner:
        return ReplyRunner(
            index,
            events,
            counter,
            stop=sampling.stop,
            max_tokens=sampling.max_tokens,
            **runner_limits(service, req.bot),
        )

    await call.start(queries, make, sampling.stream)
    prompts = [c[0].content for c in conversations]
    completion_id = "cmpl-" + new_id()[:24]
    created = int(time.time())

    async def usage(answers: list[str]) -> dict[str, int]:  # counted when written
        return await call.counted_usage(req.prompts, answers, chat_format=False)

    def echoed(index: int, text: str) -> str:
        return prompts[index] + text if req.echo else text

    if not sampling.stream:
        await call.collect()
        runners = call.runners
        choices = [(echoed(r.index, r.final_text), r.finish_reason or "stop") for r in runners]
        answered = await usage([r.final_text for r in runners])
        call.done("answered")
        return AnswerJSON(
            completions.text_completion(completion_id, created, req.model, choices, answered)
        )

    def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return completions.completion_chunk(completion_id, created, req.model, index, text, finish)

    text_events = [TextEvents(partial(chunk, i)) for i in range(len(queries))]

    async def body() -> AsyncIterator[bytes]:
        if req.echo:
            for index, prompt in enumerate(prompts):
                yield text_events[index](prompt)
        async for piece in call.pieces():
            if piece is None:
                yield KEEPALIVE
                continue
            if isinstance(piece, OpenAIError):
                yield sse(piece.body())
                return
            if piece.finish:
                yield sse(chunk(piece.index, piece.text, piece.finish))
            elif piece.text:
                yield text_events[piece.index](piece.text)
        if sampling.include_usage:
            yield sse(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": req.model,
                    "choices": [],
                    "usage": await usage([r.text for r in call.runners]),
                }
            )
        yield SSE_DONE
        await call.counted_answers([r.text for r in call.runners])
        call.done("streamed", [r.text for r in call.runners])

    return call.stream(request, body)


# --- images ------------------------------------------------------------------------------------


def no_image(bot: str, answer: str) -> OpenAIError:
    return OpenAIError(
        502,
        f"The bot `{bot}` answered without an image file: {answer[:200]!r}. Use an image bot "
        "(e.g. dall-e-3, FLUX-pro-1.1).",
        "server_error",
        "no_image",
        None,
        dict(NO_RETRY),  # the bot answered (and charged); asked again it answers text again
    )


async def image_generations(service: Service, request: Request) -> Response:
    auth = service.authenticate(request)
    req = images.parse_image_request(await service.json(request), service.model_map)
    auth = await service.pick_key(auth)
    call = Call(service, auth, req.model, req.bot, request)
    message = ProtocolMessage(role="user", content=req.prompt)
    sampling = chat.Sampling(parameters=images.bot_parameters(req))
    query = chat.to_query(
        chat.ChatRequest(req.model, req.bot, [message], sampling=sampling), new_id
    )
    counter = call.counter
    limits = runner_limits(service, req.bot)
    await call.start(
        one_query_per_choice(query, req.n),
        lambda i, events: ReplyRunner(i, events, counter, **limits),
        False,
    )
    await call.collect()
    items: list[dict[str, str]] = []
    for runner in call.runners:
        files = [
            f.url for f in runner.reply.answer.files if (f.content_type or "").startswith("image/")
        ]
        if req.response_format == "b64_json":
            # Only files Poe itself returned are fetched, never a link found in the bot's
            # text (which a prompt could point anywhere).
            if not files:
                raise no_image(req.bot, runner.final_text)
            try:
                data = await service.poe.download(files[0])
            except OpenAIError as err:
                call.failed(err, "fetching the image")
                # The picture was made and paid for: a retry would pay for another.
                err.headers.update(NO_RETRY)
                raise
            items.append({"b64_json": base64.b64encode(data).decode()})
        else:
            # The files first: a replacement after an inline image drops its link from the text.
            urls = files or images.image_urls(runner.final_text)
            if not urls:
                raise no_image(req.bot, runner.final_text)
            items.append({"url": urls[0]})
    for item in items:
        item["revised_prompt"] = req.prompt
    call.done("drew")
    return AnswerJSON(images.images_response(int(time.time()), items))


# --- the Responses API ---------------------------------------------------------------------------


async def responses_create(service: Service, request: Request) -> Response:
    auth = service.authenticate(request)
    body = await service.json(request)
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise bad_request("previous_response_id must be a string.", "previous_response_id")
        stored = await stored_or_503(service.state.get_response(previous, auth.owner))
        if stored is None:
            raise responses.unknown_response(previous)
        history = stored.conversation
    references = responses.referenced_ids(body.get("input"))
    found = await stored_or_503(service.state.get_items(references, auth.owner), "input")
    lookup = found.get
    limit = service.settings.max_body_bytes
    req = responses.parse_request(
        body, history, service.model_map, service.settings.max_file_bytes, lookup, limit
    )
    conversation = [*history, *responses.input_to_messages(body.get("input"), lookup, limit)]
    auth = await service.pick_key(auth)
    call = Call(service, auth, req.model, req.bot, request)
    counter = call.counter
    try:
        query = await attach(service, req, chat.to_query(req, new_id), auth)
    except PoeError as e:
        raise call.failure(e, "uploading") from None

    def make(index: int, events: Any) -> ReplyRunner:
        return ReplyRunner(
            index,
            events,
            counter,
            parallel_tool_calls=req.parallel_tool_calls,
            stop=req.sampling.stop,
            max_tokens=req.sampling.max_tokens,
            json_mode=req.json_mode,
            json_schema=req.json_schema,
            **runner_limits(service, req.bot),
        )

    await call.start([query], make, req.stream)

    builder = responses.ResponseBuilder(body, req.model, body.get("tools") or [])

    async def counted() -> dict[str, int]:  # counted when written, not on the way
        prompts = [m.content for m in query.query]
        return await call.counted_usage(prompts, [call.runners[0].text], chat_format=True)

    def feed(piece: Piece) -> list[dict[str, Any]]:
        events = builder.text(piece.text) + builder.tool_calls(piece.tool_calls)
        if piece.finish:
            prompts = [m.content for m in query.query]  # (counted before: see counted())
            usage = call.usage(prompts, [call.runners[0].text], chat_format=True)
            events += builder.finish(piece.finish, usage)
        return events

    async def keep() -> None:
        """Store the finished response (before the client hears it is done, so that its
        next turn finds it); a store that fails never costs the client the answer."""
        if not builder.response["store"]:
            return
        try:
            await service.state.put_response(
                builder.response, [*conversation, builder.conversation_tail()], auth.owner
            )
        except Unavailable:
            pass  # logged once per outage by the state
        except Exception as e:
            call.step_failed("storing the response", e)

    if not req.stream:
        deltas: list[dict[str, Any]] = []
        finish = "stop"
        try:
            async for piece in merge(await call._started()):
                deltas += piece.tool_calls
                finish = piece.finish or finish
        except PoeError as e:
            raise call.failure(e, "while answering") from None
        await counted()
        # Poe's final text (a stream can only give what it already sent; this need not)
        feed(Piece(0, call.runners[0].final_text, deltas, finish))
        await keep()
        call.done("answered")
        return AnswerJSON(builder.response)

    async def events() -> AsyncIterator[bytes]:
        for event in builder.start():
            yield responses.sse_event(event)
        async for piece in call.pieces():
            if piece is None:
                yield KEEPALIVE
                continue
            if isinstance(piece, OpenAIError):
                for event in builder.fail(piece):
                    yield responses.sse_event(event)
                return
            if piece.finish:
                await counted()
            fed = feed(piece)
            if piece.finish:
                await keep()
            for event in fed:
                yield responses.sse_event(event)
        call.done("streamed", [call.runners[0].text])

    return call.stream(request, events)


async def responses_get(service: Service, request: Request) -> Response:
    auth = service.authenticate(request)
    response_id = request.path_params["response_id"]
    stored = await stored_or_503(service.state.get_response(response_id, auth.owner))
    if stored is None:
        raise responses.unknown_response(response_id)
    return JSONResponse(stored.response)


async def responses_delete(service: Service, request: Request) -> Response:
    auth = service.authenticate(request)
    response_id = request.path_params["response_id"]
    if not await stored_or_503(service.state.delete_response(response_id, auth.owner)):
        raise responses.unknown_response(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def stored_or_503[R](lookup: Awaitable[R], param: str | None = "previous_response_id") -> R:
    """What the response store answers; while a shared store is down, a 503 with
    Retry-After (never a 404: the response may well exist)."""
    try:
        return await lookup
    except Unavailable:
        raise store_unavailable(param) from None
