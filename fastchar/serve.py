"""`fastchar serve`: an HTTP server in the shape of OpenAI's completions API, with continuous batching.

One decode thread owns the model and one `sampler.DecodeBatch` of --max-streams rows. Every
request's streams (n per prompt) wait in a bounded FIFO queue, join the running batch at the next
character as rows free up, and leave it as they finish (their length, a stop string, or a client
that went away); one step draws a character for every running stream. A stream's text depends only
on its prompt, options and seed, never on what else runs: with a string prompt and n = 1 it is
`fastchar.generate(model, tokenizer, prompt, max_tokens, temperature, top_k, top_p, seed)`'s, and
otherwise choice i is `generate(..., prompts, num_samples=n, seed=seed)[i]`'s (stream i draws from
child i of SeedSequence(seed)).

Routes: POST /v1/completions (prompt, max_tokens, temperature, top_p, top_k, n, stop, seed, stream;
server-sent events `data: {...}` ... `data: [DONE]` when stream is true), GET /v1/models, GET /health,
and GET /, a page to try the model in a browser.

Built on uvicorn + starlette (the optional `[serve]` extra), not the standard library: uvicorn's
HTTP/1.1 parsing (h11), keep-alive, graceful shutdown on SIGINT/SIGTERM and starlette's streaming
responses, which notice a client that disconnects mid-stream and cancel the response (its streams
leave the batch at once), are proven code; http.server would need a thread per connection, has no
disconnect notice while a stream waits, and would mean writing that machinery here. No HTTP is
parsed in this file.

Not here: token ids as prompts, logprobs, echo, best_of, suffix (a 400 says so), authentication
(it listens on 127.0.0.1 unless told otherwise), more than one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from fastchar.errors import ConfigError, FastcharError
from fastchar.model import Model
from fastchar.sampler import DecodeBatch, StopScan, stream_rngs

MAX_TOKENS_DEFAULT = 16  # OpenAI's default
MAX_TOKENS_LIMIT = 1_000_000  # characters per choice
MAX_PROMPT_CHARS = 1_000_000  # only the last ctx characters condition the model
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_BODY_BYTES = 16 * 2**20  # a larger request body is a 413, refused before it is all read
BODY_SECONDS = 30.0  # a body not all received by then is a 408 (uvicorn has no timeout for reading one)
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
# Seconds between two events of one streamed response (text made meanwhile is sent together): at least
# EVENT_GAP, and long enough that all the streamed responses together send about EVENTS_PER_SECOND
# events at most. An event costs the event loop and its client about as much whatever text it carries
# (~0.1 ms each on Zen 4), so their share of the cores stays bounded however fast the decode runs:
# 0.02 s for up to 6 streams, 0.2 s at 64.
EVENT_GAP = 0.02
EVENTS_PER_SECOND = 320
RETRY_AFTER = 1  # seconds, the 503's Retry-After
SHUTDOWN_GRACE = 5  # seconds uvicorn waits for open responses after a signal (ours end at once)
# The decode thread holds the GIL only between two batched steps, but waits for it after each: with
# Python's default 5 ms switch interval a busy event loop delays every step by up to that much.
SWITCH_INTERVAL = 0.0005
MAX_CHUNK = 16  # characters per call of the batched loop while the batch is full (see Engine._chunk)
CHUNK_SECONDS = 0.02
# OpenAI's options this server does not implement: accepted only at their defaults (or null)
UNSUPPORTED = {
    "echo": False,
    "logprobs": None,
    "best_of": 1,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
}


class RequestError(FastcharError):
    """A bad request: answered with a 400 and this message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Busy(FastcharError):
    """The queue is full: answered with a 503."""


@dataclass
class Options:
    """A checked completions request."""

    prompts: list[str]  # one per choice, in choice order
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: list[str]
    seed: int | None
    stream: bool
    single: bool  # a string prompt and n = 1: generate's single-prompt seeding (default_rng(seed))
    n: int = 1  # choices per prompt (prompts holds each prompt n times)


@dataclass
class Stream:
    """One choice of a request, as the decode thread sees it."""

    job: Job
    index: int
    ids: list[int]
    rng: np.random.Generator
    scan: StopScan | None
    made: int = 0
    row: int = -1


@dataclass
class Job:
    """One request, shared by the decode thread and the request's response on the event loop.

    The decode thread appends each choice's new text to pieces[i] and then sets finish[i]; the
    response takes text from the front of pieces[i] (only the decode thread appends, only the
    response removes: each list operation is atomic under the GIL, so neither loses a piece). The
    event loop is woken only when a response waits (waiter) and something it waits for came: text,
    if want_text, or an end. One wake-up per call of the batched loop for all of them (Engine._wake)."""

    options: Options
    loop: asyncio.AbstractEventLoop
    pieces: list[list[str]] = field(default_factory=list)  # per choice, text not yet taken
    finish: list[str | None] = field(default_factory=list)  # per choice: "length", "stop" or None
    error: str | None = None
    cancelled: bool = False
    waiter: asyncio.Future | None = None  # the response's pending wait (set and cleared on the event loop)
    want_text: bool = False  # whether new text resolves waiter (otherwise only an end or an error)

    @property
    def done(self) -> bool:
        return self.error is not None or all(f is not None for f in self.finish)

    def has_text(self) -> bool:
        return any(self.pieces)

    def take(self, i: int) -> str:
        """Choice i's text made since the last take (event loop)."""
        pieces = self.pieces[i]
        m = len(pieces)
        if m == 0:
            return ""
        text = pieces[0] if m == 1 else "".join(pieces[:m])
        del pieces[:m]
        return text


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    """A finite int or float, not a bool (an int of any size: math.isfinite would overflow on one
    beyond float's range, and the range checks reject it anyway)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    return isinstance(x, int) or math.isfinite(x)


def _at_default(value: object, default: object) -> bool:
    """null, or default itself: equal and the same kind (true is not best_of 1, 0 is not logprobs null)."""
    return value is None or (isinstance(value, bool) == isinstance(default, bool) and value == default)


def parse_request(body: object, vocab: dict[str, int], max_streams: int) -> Options:
    """The options of a completions request body (parsed JSON), or RequestError saying what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, default in UNSUPPORTED.items():
        if not _at_default(body.get(key), default):
            raise RequestError(f"{key!r} is not supported by this server (only {json.dumps(default)})", key)
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise RequestError(
            "'prompt' must be a string or a non-empty list of strings (token ids are not supported)", "prompt"
        )
    for p in prompts:
        if len(p) > MAX_PROMPT_CHARS:
            raise RequestError(f"a prompt has {len(p):,} characters; at most {MAX_PROMPT_CHARS:,}", "prompt")
        unknown = sorted(set(p) - vocab.keys())
        if unknown:
            raise RequestError(
                f"the prompt has characters the model's vocabulary lacks: {json.dumps(''.join(unknown))}", "prompt"
            )
    max_tokens = body.get("max_tokens", MAX_TOKENS_DEFAULT)
    max_tokens = MAX_TOKENS_DEFAULT if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or not 0 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise RequestError(
            f"'max_tokens' must be an integer in [0, {MAX_TOKENS_LIMIT}], got {max_tokens!r}", "max_tokens"
        )
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            f"'temperature' must be a number in [0, {MAX_TEMPERATURE:g}], got {temperature!r}", "temperature"
        )
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise RequestError(f"'top_p' must be a number in (0, 1], got {top_p!r}", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise RequestError(f"'top_k' must be an integer >= 1, got {top_k!r}", "top_k")
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= max_streams:
        raise RequestError(f"'n' must be an integer in [1, {max_streams}] (--max-streams), got {n!r}", "n")
    if len(prompts) * n > max_streams:
        raise RequestError(
            f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} streams; this server runs at most "
            f"{max_streams} (--max-streams)",
            "n",
        )
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(t, str) and t for t in stops):
        raise RequestError(
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them, got {stop!r}", "stop"
        )
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(f"'seed' must be an integer >= 0, got {seed!r}", "seed")
    stream = body.get("stream")
    stream = False if stream is None else stream  # null is the default, as for every other option
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", "stream")
    choices = [p for p in prompts for _ in range(n)]  # generate's order: each prompt n times
    single = isinstance(prompt, str) and n == 1
    return Options(
        choices,
        max_tokens,
        float(temperature),
        top_k,
        None if top_p is None else float(top_p),
        stops,
        seed,
        stream,
        single,
        n,
    )


class Engine:
    """The decode thread and its admission: submit() queues a request's streams (or raises Busy),
    cancel() takes them out, the thread runs DecodeBatch.step() while any stream runs."""

    def __init__(self, model: Model, max_streams: int, max_queue: int, threads: int | None = None) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_streams = max_streams
        self.max_queue = max_queue
        self.threads = threads
        self.batch = DecodeBatch(model, max_streams)
        self._prompt_start = self.tokenizer.stoi.get("\n", 0)  # an empty prompt starts from a newline
        self._cv = threading.Condition()
        self._queue: deque[Stream] = deque()
        self._row_stream: list[Stream | None] = [None] * max_streams  # the stream in each row of the batch
        self._left = np.zeros(max_streams, np.int64)  # characters each row has still to make
        self._scanning: set[int] = set()  # rows whose stream has stop strings
        self._drop: list[Stream] = []  # running streams of cancelled jobs, to leave before the next step
        self._running = 0
        self._per_char = 0.0  # seconds per character of the last call
        self._chars = np.array(self.tokenizer.chars, dtype=object)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop (set by submit)
        self._held = 0  # streams queued or running, cancelled ones not counted
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fastchar-decode", daemon=True)
        self.steps = 0
        self.chars = 0
        self.step_seconds = 0.0  # in DecodeBatch.step (the compiled batched loop)
        self.loop_seconds = 0.0  # in the decode thread's own Python around it (text, stop strings, hand-over)
        self.decode_cpu_seconds = 0.0  # the decode thread's CPU time (its share of the batched step and its Python)
        self.python_cpu_seconds = 0.0  # the decode thread's CPU time in its Python after each step

    @property
    def running(self) -> int:
        """Streams in the batch now (read without the lock: a hint for pacing)."""
        return self._running

    def start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread.start()

    def stats(self) -> dict:
        with self._cv:
            return {
                "running": self._running,
                "queued": len(self._queue),
                "max_streams": self.max_streams,
                "max_queue": self.max_queue,
                "steps": self.steps,
                "characters": self.chars,
                "step_seconds": round(self.step_seconds, 6),
                "loop_seconds": round(self.loop_seconds, 6),
                "decode_cpu_seconds": round(self.decode_cpu_seconds, 6),
                "python_cpu_seconds": round(self.python_cpu_seconds, 6),
            }

    def submit(self, options: Options, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a request's streams; Busy if they do not fit in the running rows and the queue."""
        k = len(options.prompts)
        job = Job(options, loop, [[] for _ in range(k)], [None] * k)
        rngs = [np.random.default_rng(options.seed)] if options.single else stream_rngs(options.seed, k)
        streams = []
        encoded: dict[str, list[int]] = {}  # each prompt once (n choices share it)
        window = self.batch.window
        for i, (prompt, rng) in enumerate(zip(options.prompts, rngs, strict=True)):
            ids = encoded.get(prompt)
            if ids is None:
                # only the last `window` characters condition the model (add_row keeps those): a long
                # prompt is not encoded and kept whole, once per choice
                tail = prompt[-window:]
                ids = encoded[prompt] = [int(t) for t in self.tokenizer.encode(tail)] if tail else [self._prompt_start]
            scan = StopScan(options.stop) if options.stop else None
            streams.append(Stream(job, i, ids, rng, scan))
        with self._cv:
            if self._stopping:
                raise Busy("the server is shutting down")
            if self._held + k > self.max_streams + self.max_queue:
                raise Busy(
                    f"the server is busy: {self._running} streams running and {len(self._queue)} waiting "
                    f"(--max-streams {self.max_streams}, --max-queue {self.max_queue}); retry later"
                )
            self._held += k
            self.loop = loop
            self._queue.extend(streams)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: its queued streams leave now, its running ones before the next step."""
        with self._cv:
            if job.cancelled or job.done:
                job.cancelled = True
                return
            job.cancelled = True
            kept = deque(s for s in self._queue if s.job is not job)
            gone = len(self._queue) - len(kept)
            self._queue = kept
            running = [s for s in self._row_stream if s is not None and s.job is job]
            self._drop.extend(running)
            self._held -= gone + len(running)
            self._cv.notify()

    def stop(self) -> None:
        """End every stream (their responses end with an error event) and the decode thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the decode thread ------------------------------------------------------------------------

    def _run(self) -> None:
        from fastchar.threads import set_threads

        set_threads(self.threads)  # OpenMP's thread count is a per-thread setting: set it in this one
        try:
            while self._admit():
                self._step()
        except Exception as exc:  # noqa: BLE001 (every waiting client gets the message, then the thread ends)
            print(f"error: the decode thread stopped: {exc!r}", file=sys.stderr, flush=True)
            self._end_all(f"the decode thread stopped: {exc}")
            return
        self._end_all("the server is shutting down")

    def _admit(self) -> bool:
        """Drop cancelled streams' rows, fill free rows from the queue, wait while nothing runs;
        False to stop."""
        wake: list[asyncio.Future] = []
        with self._cv:
            while True:
                if self._stopping:
                    return False
                for s in self._drop:
                    if s.row >= 0 and self._row_stream[s.row] is s:
                        self._free_row(s)
                self._drop.clear()
                while self._queue and self.batch.free_rows:
                    s = self._queue.popleft()
                    opt = s.job.options
                    if opt.max_tokens == 0:
                        self._held -= 1
                        _end(s.job, s.index, "length", wake)
                        continue
                    s.row = self.batch.add_row(s.ids, opt.temperature, opt.top_k, opt.top_p, s.rng)
                    self._row_stream[s.row] = s
                    self._left[s.row] = opt.max_tokens
                    if s.scan is not None:
                        self._scanning.add(s.row)
                    self._running += 1
                if self._running:
                    break
                self._wake(wake)
                wake = []
                self._cv.wait()
        self._wake(wake)
        return True

    def _free_row(self, s: Stream) -> None:
        self.batch.remove_row(s.row)
        self._row_stream[s.row] = None
        self._scanning.discard(s.row)
        self._running -= 1
        s.row = -1

    def _chunk(self) -> int:
        """Characters for the next call: 1 (every stream may leave, and a new one join, at the next
        character), or up to MAX_CHUNK while no row is free (nobody could join), no stream has stop
        strings and none is cancelled, never past the end of the stream that ends first, and about
        CHUNK_SECONDS at most: a full batch then returns to Python, and to the GIL, less often."""
        if self.batch.free_rows or self._scanning or self._drop:
            return 1
        n = min(MAX_CHUNK, int(self._left[self.batch.rows].min()), int(CHUNK_SECONDS / max(self._per_char, 1e-6)))
        return max(n, 1)

    def _step(self) -> None:
        """n characters for every running stream, appended to their jobs' pieces; one wake-up of the
        event loop for the responses that wait for them. Per-stream Python is one append (and the
        stop strings of the streams that have some): the decode thread's share of the GIL stays small."""
        n = self._chunk()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        rows, tokens = self.batch.step(n)  # the GIL is released while it runs
        t1 = time.perf_counter()
        c1 = time.thread_time()
        self.step_seconds += t1 - t0
        self._per_char = (t1 - t0) / n
        left = self._left
        left[rows] -= n
        pieces = self._chars[tokens].tolist() if n == 1 else ["".join(x) for x in self._chars[tokens].tolist()]
        row_list = rows.tolist()
        ends: dict[int, str] = {}  # position in rows -> finish_reason
        wake: list[asyncio.Future] = []
        with self._cv:
            self.steps += 1
            self.chars += rows.size * n
            streams = [self._row_stream[r] for r in row_list]
            if self._scanning:
                for i, row in enumerate(row_list):
                    if row in self._scanning:
                        scan = streams[i].scan
                        pieces[i] = scan.feed(pieces[i])
                        if scan.done:
                            ends[i] = "stop"
                        elif left[row] <= 0:
                            pieces[i] += scan.flush()
            for i in np.flatnonzero(left[rows] <= 0).tolist():
                ends.setdefault(i, "length")
            for i in ends:
                s = streams[i]
                self._free_row(s)
                if not s.job.cancelled:  # a cancelled job's streams left the count when it was cancelled
                    self._held -= 1
        for s, text in zip(streams, pieces, strict=True):
            job = s.job
            if text:
                job.pieces[s.index].append(text)
            waiter = job.waiter  # read once: the event loop may clear it meanwhile
            if waiter is not None and job.want_text:
                wake.append(waiter)
        for i, reason in ends.items():
            _end(streams[i].job, streams[i].index, reason, wake)
        self._wake(wake)
        self.loop_seconds += time.perf_counter() - t1
        c2 = time.thread_time()
        self.decode_cpu_seconds += c2 - c0
        self.python_cpu_seconds += c2 - c1

    def _end_all(self, message: str) -> None:
        with self._cv:
            self._stopping = True
            running = [s for s in self._row_stream if s is not None]
            jobs = {id(s.job): s.job for s in [*self._queue, *running]}
            self._queue.clear()
            for s in running:
                self._free_row(s)
            self._held = 0
        for job in jobs.values():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                job.loop.call_soon_threadsafe(_fail, job, message)

    def _wake(self, futures: list[asyncio.Future]) -> None:
        """Resolve the responses' waits on the event loop: one call for all of them."""
        if futures:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                self.loop.call_soon_threadsafe(_resolve_all, futures)


def _end(job: Job, index: int, reason: str, wake: list) -> None:
    """Decode thread: choice index of job ended (after its last text was appended); wake its response."""
    job.finish[index] = reason
    waiter = job.waiter  # read once: the event loop may clear it meanwhile
    if waiter is not None:
        wake.append(waiter)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_all(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _fail(job: Job, message: str) -> None:
    job.error = message
    if job.waiter is not None:
        _resolve(job.waiter)


def _news(job: Job, reported: list[bool], text: bool) -> bool:
    """An error, a choice that ended and is not reported yet, or (if text) new text."""
    if job.error is not None or (text and job.has_text()):
        return True
    return any(f is not None and not r for f, r in zip(job.finish, reported, strict=True))


async def _wait(job: Job, deadline: float, reported: list[bool]) -> None:
    """Until job has an error or a choice ended that is not reported yet, or (from the event loop's
    time deadline on) it has new text. The decode thread wakes this wait only for what it waits for:
    text made before deadline is left to gather (one event carries it all)."""
    loop = job.loop
    while True:
        ready = loop.time() >= deadline
        if _news(job, reported, ready):
            return
        future = loop.create_future()
        job.want_text = ready  # before waiter: a decode thread that sees the waiter sees this too
        job.waiter = future
        if _news(job, reported, ready):  # the decode thread may have added some just before it saw the waiter
            job.waiter = None
            return
        timer = None if ready else loop.call_at(deadline, _resolve, future)
        try:
            await future
        finally:
            job.waiter = None
            job.want_text = False
            if timer is not None:
                timer.cancel()


# -- the HTTP side ---------------------------------------------------------------------------------


def _require_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"`fastchar serve` needs uvicorn and starlette ({exc.name} is missing)",
            hint="pip install 'fastchar[serve]'",
        ) from None


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None):
    from starlette.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def page_html() -> str:
    """The page at GET / (fastchar/serve_page.html)."""
    return resources.files("fastchar").joinpath("serve_page.html").read_text(encoding="utf-8")


async def _read_body(request) -> bytes | None:
    """The request's body, or None as soon as it is known to exceed MAX_BODY_BYTES (its declared
    length, or the bytes received so far): a huge body is never held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(engine: Engine, model_id: str):
    """The starlette application: the four routes over engine (started and stopped with the app)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    vocab = engine.tokenizer.stoi
    html = page_html()
    created = int(time.time())

    async def home(request: Request):
        return HTMLResponse(html)

    async def health(request: Request):
        # event_loop_cpu_seconds: this thread's CPU time (HTTP, JSON, the responses), beside the decode's
        return JSONResponse({"status": "ok", **engine.stats(), "event_loop_cpu_seconds": round(time.thread_time(), 6)})

    async def models(request: Request):
        cfg = engine.model.cfg
        card = {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "fastchar",
            "ctx": cfg.ctx,
            "vocabulary": "".join(engine.tokenizer.chars),
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request: Request):
        try:
            raw = await asyncio.wait_for(_read_body(request), BODY_SECONDS)
        except ClientDisconnect:  # the client went away before its whole body came: nobody to answer
            return Response(status_code=400)
        except asyncio.TimeoutError:  # a client that sends part of its body and then nothing
            return _error(408, f"the request body did not arrive within {BODY_SECONDS:g} s", "invalid_request_error")
        if raw is None:
            return _error(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MB", "invalid_request_error")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
            if isinstance(exc, RecursionError):
                exc = "it is nested too deeply"
            return _error(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")
        try:
            options = parse_request(body, vocab, engine.max_streams)
            job = engine.submit(options, asyncio.get_running_loop())
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request_error", exc.param)
        except Busy as exc:
            return _error(503, str(exc), "server_busy", headers={"Retry-After": str(RETRY_AFTER)})
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
        }
        if options.stream:
            return StreamingResponse(
                _events(engine, job, head),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _whole(engine, job, head, request)

    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)  # a 405's Allow

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


class _EventText:
    """One choice's server-sent event, built as json.dumps({**head, "choices": [choice]}) would, with
    the head encoded once per response: only the new text goes through the JSON encoder."""

    def __init__(self, head: dict) -> None:
        self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": [{"text": '

    def __call__(self, i: int, text: str, finish: str | None) -> str:
        reason = "null" if finish is None else json.dumps(finish)
        return f'{self.prefix}{json.dumps(text)}, "index": {i}, "logprobs": null, "finish_reason": {reason}}}]}}\n\n'


def event_gap(running: int) -> float:
    """Seconds between two events of one streamed response at `running` streams: text made meanwhile
    is sent together (coalesced), so that the events per second, and their cost to the event loop
    and the clients, stay bounded however fast the decode runs."""
    return max(EVENT_GAP, running / EVENTS_PER_SECOND)


async def _events(engine: Engine, job: Job, head: dict):
    """Server-sent events: each choice's text made since its last event (at most one event per choice
    every event_gap(), and at once when a choice ends), its finish_reason on its last event, then
    [DONE]. A client or an event loop that falls behind gets more text per event, never a backlog of
    events. A client that disconnects cancels this generator (starlette), and its streams leave the
    batch."""
    event = _EventText(head)
    reported = [False] * len(job.finish)
    loop = job.loop
    deadline = 0.0  # the first text goes out as soon as it is made
    try:
        while True:
            await _wait(job, deadline, reported)
            if job.error is not None:
                yield f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n"
                return
            out = []
            for i in range(len(reported)):
                finish = job.finish[i]  # read before the text: an ended choice's text is all in by then
                ended = finish is not None and not reported[i]
                text = job.take(i)
                if text or ended:
                    reported[i] = reported[i] or ended
                    out.append(event(i, text, finish if ended else None))
            if all(reported):
                yield "".join(out) + "data: [DONE]\n\n"
                return
            if out:
                yield "".join(out)
                deadline = loop.time() + event_gap(engine.running)  # let text gather
    finally:
        engine.cancel(job)


async def _whole(engine: Engine, job: Job, head: dict, request) -> object:
    """The whole answer once every choice has finished; a client that disconnects first cancels it."""
    from starlette.responses import JSONResponse

    async def finished() -> None:
        while not job.done:
            await _wait(job, math.inf, [f is not None for f in job.finish])

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    wait, watch = asyncio.ensure_future(finished()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait([wait, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wait, watch):
            task.cancel()
        engine.cancel(job)
    if not job.done:
        return _error(499, "the client closed the connection", "client_closed")
    if job.error is not None:
        return _error(503, job.error, "server_error")
    texts = [job.take(i) for i in range(len(job.finish))]
    made = sum(len(t) for t in texts)
    prompt_chars = sum(len(p) for p in job.options.prompts) // job.options.n  # each prompt once, as OpenAI
    usage = {"prompt_tokens": prompt_chars, "completion_tokens": made, "total_tokens": prompt_chars + made}
    choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": job.finish[i]} for i, t in enumerate(texts)]
    return JSONResponse({**head, "choices": choices, "usage": usage})


def _uvicorn_server(app, host: str, port: int, log_level: str = "info"):
    """A uvicorn Server that ends every stream at the first SIGINT/SIGTERM and does not re-raise the
    signal afterwards (stopped_by records it: the command exits 0 after a clean stop)."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: int | None = None
        engine: Engine | None = None
        on_started = None

        def handle_exit(self, sig: int, frame: object) -> None:
            self.stopped_by = self.stopped_by or sig
            super().handle_exit(sig, frame)
            if self.engine is not None:
                self.engine.stop()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.on_started is not None and self.started:
                self.on_started(self)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=SHUTDOWN_GRACE
    )
    return Server(config)


def bound_port(server) -> int:
    """The port a started uvicorn server listens on (for --port 0)."""
    return server.servers[0].sockets[0].getsockname()[1]


def make_server(
    model: Model,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_streams: int = 64,
    max_queue: int | None = None,
    model_id: str = "fastchar",
    threads: int | None = None,
    log_level: str = "info",
):
    """A uvicorn server for model (not started: .run() blocks, or serve it from a thread in tests)."""
    _require_serve_extra()
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer", hint="serve a checkpoint a training run wrote")
    if not _is_int(max_streams) or max_streams < 1:
        raise ConfigError(f"--max-streams must be an integer >= 1, got {max_streams!r}")
    max_queue = 4 * max_streams if max_queue is None else max_queue
    if not _is_int(max_queue) or max_queue < 0:
        raise ConfigError(f"--max-queue must be an integer >= 0, got {max_queue!r}")
    if not _is_int(port) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port!r}")
    from fastchar.sampler import MAX_STREAMS, check_streams_memory

    if max_streams > MAX_STREAMS:  # every row's KV cache is allocated up front (DecodeBatch)
        raise ConfigError(f"--max-streams must be at most {MAX_STREAMS:,}, got {max_streams:,}",
                          hint=f"pass --max-streams {MAX_STREAMS} or less (the default is 64)")  # fmt: skip
    check_streams_memory(model, max_streams, model.cfg.ctx, flag="--max-streams")
    engine = Engine(model, max_streams, max_queue, threads)
    server = _uvicorn_server(build_app(engine, model_id), host, port, log_level)
    server.engine = engine
    return server
