"""The ``[batches]`` config section: where batch jobs keep their state, and their limits."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["BatchSettings"]

_DAY_S = 86400.0


class BatchSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[batches]``: the OpenAI Files and Batch API (``/v1/files``, ``/v1/batches``)."""

    #: Holds ``jobs.sqlite`` (state, WAL) and ``files/``; defaults to ``<cache_dir>/batches``.
    data_dir: str | None = None
    #: Largest uploaded file.
    max_file_bytes: Annotated[int, Meta(ge=1)] = 200 * 1024 * 1024
    #: Largest line of an input file (its JSON, in bytes).
    max_line_bytes: Annotated[int, Meta(ge=1)] = 1024 * 1024
    #: Most lines in one input file.
    max_lines: Annotated[int, Meta(ge=1)] = 50_000
    #: How many times a line is tried (a 5xx or 429 answer is tried again); then its last
    #: answer goes to the error file.
    max_attempts: Annotated[int, Meta(ge=1)] = 3
    #: Seconds before a retry, times the attempt number.
    retry_backoff_s: Annotated[float, Meta(ge=0)] = 1.0
    #: The batch share: at most this many batch lines of all jobs in flight per model. Each
    #: line costs event-loop work while interactive requests run; raise it for a job's
    #: throughput on a model that interactive traffic leaves idle.
    max_in_flight_per_model: Annotated[int, Meta(ge=1)] = 2
    #: A batch line enters the pipeline only while fewer interactive requests than this wait
    #: in the model's queue (the batcher then serves it behind every interactive request).
    admit_below_queue_depth: Annotated[int, Meta(ge=1)] = 4
    #: How often a waiting line looks at the queue again (seconds).
    admit_poll_s: Annotated[float, Meta(gt=0)] = 0.02
    #: Answered lines are committed to the database in groups: once this many wait, ...
    checkpoint_every_lines: Annotated[int, Meta(ge=1)] = 32
    #: ... and at most this long (seconds) after a line is answered. A line answered but not
    #: committed when the process dies runs again after the restart (the output still holds
    #: it once); ``checkpoint_every_lines = 1`` commits every line on its own.
    checkpoint_every_s: Annotated[float, Meta(ge=0)] = 0.1
    #: Seconds an uploaded or output file is kept; None keeps files until deleted.
    file_expiry_s: Annotated[float, Meta(gt=0)] | None = 30 * _DAY_S
    #: Bytes of files one principal may store; None: no quota.
    max_stored_bytes_per_principal: Annotated[int, Meta(ge=1)] | None = None
    #: Batches one principal may have unfinished at once; None: no quota.
    max_running_batches_per_principal: Annotated[int, Meta(ge=1)] | None = None
