"""Continuous batching over llama.cpp's multi-sequence batch API.

One dedicated thread owns the llama context and runs the decode loop. Each step it takes new
requests into free sequence slots, then makes one ``llama_decode`` call holding the next token
of every decoding sequence plus at most ``prefill_chunk`` prompt tokens of newcomers (the whole
``n_batch`` when nothing is decoding), samples each sequence with its own sampler chain, and
hands text back to asyncio with ``loop.call_soon_threadsafe``. A finished or abandoned sequence
frees its slot before the next step, so a waiting request joins at once. With the prefix cache
on, the slot keeps its KV cells and the next request that shares a prefix with them decodes
only the rest of its prompt (``slots.py`` picks the slot); otherwise the cells are cleared.

The asyncio side (``Engine``) only queues commands (``queue.SimpleQueue``, thread-safe) and
reads per-request ``asyncio.Queue``s; it never touches llama.cpp.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from modelyard.backends.llamacpp.runtime import BatchEntry, LlamaRuntime
from modelyard.backends.llamacpp.slots import PrefixCacheStats, Slots
from modelyard.core.errors import BackendError, QueueFullError, ServiceUnavailableError
from modelyard.core.types import GenerationParams, StreamChunk

__all__ = ["Engine", "Generation", "StopMatcher"]

log = logging.getLogger(__name__)

Event = StreamChunk | Exception
Deliver = Callable[[Event], None]


class StopMatcher:
    """Finds stop sequences in streamed text, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop sequence was reached."""
        held = self.held + text
        if not self.stops:
            self.held = ""
            return held, False
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return held[:cut], True
        keep = self._longest_stop_prefix_suffix(held)
        self.held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """The held tail, once generation ends without completing a stop sequence."""
        held, self.held = self.held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best


class _Job:
    """One generation request as the engine thread sees it."""

    __slots__ = ("deliver", "max_tokens", "params", "prompt")

    def __init__(
        self, prompt: list[int], params: GenerationParams, max_tokens: int, deliver: Deliver
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.max_tokens = max_tokens
        self.deliver = deliver


class _EmbedJob:
    __slots__ = ("deliver", "inputs")

    def __init__(self, inputs: list[list[int]], deliver: Callable[[Any], None]) -> None:
        self.inputs = inputs
        self.deliver = deliver


class _Sequence:
    """A job holding a slot: its KV cells live under ``seq_id`` until it is released."""

    __slots__ = ("decoder", "fed", "generated", "job", "last_token", "output", "sampler",
                 "seq_id", "stops")

    def __init__(self, job: _Job, seq_id: int, sampler: Any, reused: int) -> None:
        self.job = job
        self.seq_id = seq_id
        self.sampler = sampler
        self.fed = reused  # tokens in the KV cache = position of the next token
        self.last_token = -1
        self.generated = 0
        self.output: list[int] = []  # sampled tokens, for what the slot's cells hold at the end
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(job.params.stop)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.job.prompt)

    def kv_tokens(self) -> list[int]:
        """The tokens whose KV cells this sequence has written: prompt, then fed output."""
        tokens = self.job.prompt + self.output
        del tokens[self.fed :]
        return tokens


class _Stop:
    """The command that ends the engine thread."""


class _Cancel:
    """The command that drops a job, waiting or running (its client went away)."""

    __slots__ = ("job",)

    def __init__(self, job: _Job) -> None:
        self.job = job


class _Scheduler:
    """The engine thread's state: slots, waiting jobs, and the decode loop."""

    def __init__(
        self,
        runtime: LlamaRuntime,
        commands: queue.SimpleQueue[Any],
        loop: asyncio.AbstractEventLoop,
        prefill_chunk: int,
        normalize: bool,
        slots: Slots,
    ) -> None:
        self.rt = runtime
        self.commands = commands
        self.loop = loop
        self.prefill_chunk = prefill_chunk
        self.normalize = normalize
        # With one KV stream per sequence, llama.cpp puts only consecutive sequence ids into
        # one micro-batch, so {0, 5, 1, 7} costs a weight pass per run of ids each step:
        # ``Slots`` hands out ids that keep the active ones dense.
        self.slots = slots
        self.waiting: collections.deque[_Job] = collections.deque()
        self.active: dict[int, _Sequence] = {}
        self.by_job: dict[_Job, _Sequence] = {}
        self.outbox: list[tuple[Deliver, Event]] = []
        self.steps = 0

    def run(self) -> None:
        try:
            while self._drain(block=not self.active and not self.waiting):
                self._admit()
                if self.active:
                    self._step_safely()
                self._flush_outbox()
        finally:
            self._shutdown()

    # -- commands ------------------------------------------------------------------------

    def _drain(self, *, block: bool) -> bool:
        """Apply queued commands; False once told to stop."""
        try:
            command = self.commands.get() if block else self.commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Job):
                self.waiting.append(command)
            elif isinstance(command, _EmbedJob):
                self._embed(command)
            elif isinstance(command, _Cancel):
                self._cancel(command.job)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _cancel(self, job: _Job) -> None:
        seq = self.by_job.get(job)
        if seq is not None:
            self._release(seq)
            return
        try:
            self.waiting.remove(job)
        except ValueError:
            pass  # already finished: nothing to free

    def _admit(self) -> None:
        while self.slots.any_free and self.waiting:
            job = self.waiting.popleft()
            try:
                sampler = self.rt.new_sampler(job.params)
            except Exception as exc:
                log.exception("creating a sampler failed")
                error = BackendError(f"sampler setup failed: {type(exc).__name__}: {exc}")
                self.outbox.append((job.deliver, error))
                continue
            choice = self.slots.take(job.prompt, self.active)
            reused = 0
            if choice.cached:
                # Drop the cells past the shared prefix (all of them without a hit).
                reused = self.rt.keep_prefix(choice.seq_id, choice.reusable, choice.cached)
            self.slots.started(choice.seq_id, reused, len(job.prompt))
            seq = _Sequence(job, choice.seq_id, sampler, reused)
            self.active[seq.seq_id] = seq
            self.by_job[job] = seq

    def _release(self, seq: _Sequence, *, keep_cells: bool = True) -> None:
        """Free the slot; its cells stay for the prefix cache unless they cannot be trusted."""
        self.active.pop(seq.seq_id, None)
        self.by_job.pop(seq.job, None)
        kept = seq.kv_tokens() if keep_cells and self.slots.prefix_cache else None
        if kept is None:
            self.rt.forget(seq.seq_id)
        self.rt.free_sampler(seq.sampler)
        self.slots.give_back(seq.seq_id, kept)

    # -- one step ------------------------------------------------------------------------

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as exc:
            log.exception("llama.cpp engine step failed")
            for seq in list(self.active.values()):
                self._fail(seq, BackendError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _step(self) -> None:
        entries, outputs = self._plan()
        status = self.rt.decode(entries)
        self.steps += 1
        if status != 0:
            self._decode_failed(status, self._in_batch(entries))
            return
        for seq, index in outputs:
            self._accept(seq, self.rt.sample(seq.sampler, index))

    def _plan(self) -> tuple[list[BatchEntry], list[tuple[_Sequence, int]]]:
        """This step's batch: every decoder's next token, then prompt chunks of newcomers."""
        decoding = {s.seq_id for s in self.active.values() if not s.prefilling}
        room = self.rt.n_batch - len(decoding)
        budget = min(room, self.prefill_chunk) if decoding else room
        chunks: dict[int, int] = {}
        for seq in self.active.values():  # admission order: first come, first fed
            if budget <= 0:
                break
            if seq.seq_id not in decoding:
                chunks[seq.seq_id] = take = min(budget, len(seq.job.prompt) - seq.fed)
                budget -= take
        # Entries go in sequence-id order: llama.cpp splits a batch whose sequences are out
        # of order into more micro-batches (eight sequences in reverse order decode 2x slower).
        entries: list[BatchEntry] = []
        outputs: list[tuple[_Sequence, int]] = []
        for seq_id in sorted(self.active):
            seq = self.active[seq_id]
            if seq_id in decoding:
                outputs.append((seq, len(entries)))
                entries.append((seq_id, seq.last_token, seq.fed, True))
                seq.fed += 1
            elif seq_id in chunks:
                prompt, start = seq.job.prompt, seq.fed
                seq.fed += chunks[seq_id]
                finished = not seq.prefilling
                entries.extend(
                    (seq_id, prompt[position], position, finished and position == seq.fed - 1)
                    for position in range(start, seq.fed)
                )
                if finished:
                    outputs.append((seq, len(entries) - 1))
        return entries, outputs

    def _in_batch(self, entries: list[BatchEntry]) -> set[_Sequence]:
        ids = {seq_id for seq_id, *_ in entries}
        return {seq for seq in self.active.values() if seq.seq_id in ids}

    def _decode_failed(self, status: int, seqs: set[_Sequence]) -> None:
        if status == 1:
            error: Exception = ServiceUnavailableError(
                "the model's context memory is full; retry shortly", retry_after=1
            )
        else:
            error = BackendError(f"llama_decode failed with status {status}")
        for seq in seqs:
            self._fail(seq, error)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Turn a sampled token into text, stop checks and, maybe, the end of the sequence."""
        if self.rt.is_eog(token):
            self._finish(seq, "stop", seq.stops.flush() + seq.decoder.decode(b"", final=True))
            return
        seq.generated += 1
        seq.last_token = token
        seq.output.append(token)
        text, stopped = seq.stops.push(seq.decoder.decode(self.rt.piece(token)))
        if stopped:
            self._finish(seq, "stop", text)
            return
        if seq.generated >= seq.job.max_tokens or seq.fed >= self.rt.n_ctx_seq:
            tail = seq.stops.push(seq.decoder.decode(b"", final=True))[0] + seq.stops.flush()
            self._finish(seq, "length", text + tail)
            return
        if text:
            self.outbox.append((seq.job.deliver, StreamChunk(text=text)))

    def _finish(self, seq: _Sequence, reason: Any, text: str) -> None:
        self._release(seq)
        chunk = StreamChunk(
            text=text, finish_reason=reason, prompt_tokens=len(seq.job.prompt),
            completion_tokens=seq.generated,
        )
        self.outbox.append((seq.job.deliver, chunk))

    def _fail(self, seq: _Sequence, error: Exception) -> None:
        self._release(seq, keep_cells=False)  # a failed decode leaves its cells unknown
        self.outbox.append((seq.job.deliver, error))

    def _flush_outbox(self) -> None:
        if not self.outbox:
            return
        batch, self.outbox = self.outbox, []
        try:
            self.loop.call_soon_threadsafe(_dispatch, batch)
        except RuntimeError:
            pass  # the event loop is gone: nobody is listening any more

    # -- embeddings ----------------------------------------------------------------------

    def _embed(self, job: _EmbedJob) -> None:
        try:
            result: Any = self._embed_all(job.inputs)
        except Exception as exc:
            log.exception("embedding failed")
            result = BackendError(f"embedding failed: {type(exc).__name__}: {exc}")
        try:
            self.loop.call_soon_threadsafe(job.deliver, result)
        except RuntimeError:
            pass

    def _embed_all(self, inputs: list[list[int]]) -> list[list[float]]:
        vectors: list[list[float]] = []
        start = 0
        while start < len(inputs):
            group: list[list[int]] = []
            used = 0
            for tokens in inputs[start:]:
                if group and (
                    used + len(tokens) > self.rt.n_batch or len(group) >= self.rt.n_seq_max
                ):
                    break
                group.append(tokens)
                used += len(tokens)
            vectors.extend(self._embed_group(group))
            start += len(group)
        return vectors

    def _embed_group(self, group: list[list[int]]) -> list[list[float]]:
        entries: list[BatchEntry] = []
        last: list[int] = []
        for seq_id, tokens in enumerate(group):
            entries.extend((seq_id, tok, pos, True) for pos, tok in enumerate(tokens))
            last.append(len(entries) - 1)
        try:
            status = self.rt.decode(entries)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            vectors = [self.rt.sequence_embedding(i, last[i]) for i in range(len(group))]
        finally:
            for seq_id in range(len(group)):
                self.rt.forget(seq_id)
                self.slots.forget(seq_id)
        return [_unit(v) for v in vectors] if self.normalize else vectors

    # -- shutdown ------------------------------------------------------------------------

    def _shutdown(self) -> None:
        error = ServiceUnavailableError("model version is unloading")
        for seq in list(self.active.values()):
            self._fail(seq, error)
        while self.waiting:
            self.outbox.append((self.waiting.popleft().deliver, error))
        self._flush_outbox()
        self.rt.close()


def _dispatch(batch: list[tuple[Deliver, Event]]) -> None:
    for deliver, event in batch:
        deliver(event)


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


class Generation:
    """The asyncio end of one request: an async iterator of chunks, closed exactly once."""

    def __init__(self, engine: Engine, job_factory: Callable[[Deliver], _Job]) -> None:
        self._engine = engine
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.job = job_factory(self._queue.put_nowait)
        self.done = False

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Text token by token as it is generated; the last chunk has finish_reason."""
        try:
            while True:
                event = await self._queue.get()
                if isinstance(event, Exception):
                    self._settle()
                    raise event
                if event.finish_reason is not None:
                    self._settle()
                    yield event
                    return
                yield event
        finally:
            self.close()

    def close(self) -> None:
        """Give the slot back now if the generation is still running (client went away)."""
        if not self.done:
            self._settle()
            self._engine.cancel(self.job)

    def _settle(self) -> None:
        if not self.done:
            self.done = True
            self._engine.settled()


class Engine:
    """The asyncio-facing side: admission control, commands to the thread, results back."""

    def __init__(
        self,
        runtime: LlamaRuntime,
        *,
        max_queue: int,
        prefill_chunk: int,
        normalize: bool = True,
        prefix_cache: bool = False,
        min_prefix_tokens: int = 16,
    ) -> None:
        self.runtime = runtime
        self.capacity = runtime.n_seq_max + max_queue
        self.open = 0
        self._prefill_chunk = prefill_chunk
        self._normalize = normalize
        self.slots = Slots(
            runtime.n_seq_max, prefix_cache=prefix_cache, min_prefix_tokens=min_prefix_tokens
        )
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._scheduler: _Scheduler | None = None

    @property
    def steps(self) -> int:
        return self._scheduler.steps if self._scheduler is not None else 0

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache counters (plain ints the engine thread bumps; safe to read here)."""
        return self.slots.stats()

    def start(self) -> None:
        self._scheduler = _Scheduler(
            self.runtime, self._commands, asyncio.get_running_loop(), self._prefill_chunk,
            self._normalize, self.slots,
        )
        self._thread = threading.Thread(
            target=self._scheduler.run, name=f"llama.cpp engine {self.runtime.path.name}",
            daemon=True,
        )
        self._thread.start()

    async def stop(self) -> None:
        """Fail whatever is running or waiting with 503, free llama.cpp, join the thread."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: list[int], params: GenerationParams, max_tokens: int) -> Generation:
        """Queue a generation; 503 + Retry-After when every slot and queue place is taken."""
        if self.open >= self.capacity:
            raise QueueFullError(  # load shed: never counted against the version's breaker
                f"all {self.runtime.n_seq_max} slots busy and "
                f"{self.capacity - self.runtime.n_seq_max} requests waiting; retry shortly",
                retry_after=1,
            )
        if not self.alive:
            raise ServiceUnavailableError("model version is not running")
        generation = Generation(self, lambda deliver: _Job(prompt, params, max_tokens, deliver))
        self.open += 1
        self._commands.put(generation.job)
        return generation

    def cancel(self, job: _Job) -> None:
        self._commands.put(_Cancel(job))

    def settled(self) -> None:
        self.open -= 1

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        if not self.alive:
            raise ServiceUnavailableError("model version is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def deliver(result: Any) -> None:
            if future.done():
                return
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

        self._commands.put(_EmbedJob(inputs, deliver))
        vectors: list[list[float]] = await future
        return vectors
