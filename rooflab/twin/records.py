"""What the twin engine records: one StepRecord per scheduler step and RequestEvents along each
request's journey. Times are simulated (unaccelerated) monotonic nanoseconds. The OTEL writer
(``rooflab.twin.otel``) turns these into instrumented-vLLM traces; tests compare the tables read back
from the traces with these records."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepEntry:
    """One request scheduled in a step (``step.REQUEST_SNAPSHOT``), values *before* the step runs."""

    request_id: str
    phase: str  # "PREFILL" or "DECODE"
    num_prompt_tokens: int
    num_computed_tokens: int  # pre-step
    num_output_tokens: int  # pre-step
    scheduled_tokens: int  # this step


@dataclass(slots=True)
class StepRecord:
    """One scheduler step (``step.BATCH_SUMMARY``)."""

    step_id: int
    ts_start_ns: int
    ts_end_ns: int  # start + step time (the GPU forward pass and CPU overheads)
    duration_us: int  # scheduler CPU time of schedule() — like the fork, NOT the step time
    running_depth: int
    waiting_depth: int
    num_prefill_reqs: int
    num_decode_reqs: int
    scheduled_tokens: int
    prefill_tokens: int
    decode_tokens: int
    num_finished: int
    num_preempted: int
    kv_usage: float  # used / total GPU blocks after scheduling
    kv_blocks_total: int
    kv_blocks_free: int
    entries: list[StepEntry] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)


# Journey / API event kinds, as the instrumented vLLM names them
ARRIVED, DEPARTED, ABORTED = "api.ARRIVED", "api.DEPARTED", "api.ABORTED"
QUEUED, SCHEDULED, FIRST_TOKEN, PREEMPTED, FINISHED = (
    "journey.QUEUED", "journey.SCHEDULED", "journey.FIRST_TOKEN", "journey.PREEMPTED", "journey.FINISHED")


@dataclass(slots=True)
class RequestEvent:
    request_id: str
    kind: str  # one of the constants above
    ts_ns: int
    step_id: int | None = None  # scheduler step the event belongs to (journey events)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # output tokens so far
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    schedule_kind: str | None = None  # SCHEDULED: "FIRST" or "RESUME"
    finish_status: str | None = None  # FINISHED: "length" | "stop" | "abort"
    max_tokens: int = 0
