"""Faults on demand: the next calls fail as a real network and a real AWS fail.

A fault fails a call either before AWS applies it (nothing recorded: the common
refusal) or, with ``record``, after AWS recorded it (the answer is lost on the
way back). Only the second kind tests that a caller which did not hear back
retries with the same ClientToken and meters exactly once.

UNPROCESSED (BatchMeterUsage only) answers 200 but hands back the last half of
the records (ceil(n/2) of n) in ``UnprocessedRecords``, AWS's "retry these";
with ``record`` AWS kept them anyway, so only an identical resend settles them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gateway.local_aws import rules
from gateway.local_aws.saas import BATCH_METER_USAGE
from gateway.local_aws.state import AwsError

DROP = "drop"  # close the connection without an answer
SLOW = "slow"  # answer normally, ``delay`` seconds late: a slow AWS (or, past the read timeout, a lost answer)
BARE = ""  # no error type at all, only the HTTP ``status``: a load balancer's 5xx
UNPROCESSED = "unprocessed"  # BatchMeterUsage answers 200 with its last ceil(n/2) records unprocessed
DEFAULT_MESSAGE = "injected by the local backend"


@dataclass(eq=False)  # one fault is one queue entry, whatever its fields
class Fault:
    """The next ``remaining`` calls (of ``operation``, or of every operation) fail so."""

    error: str  # an AWS error code, BARE, DROP, SLOW or UNPROCESSED
    remaining: int
    message: str = DEFAULT_MESSAGE
    status: int = 400
    delay: float = 0.0  # seconds before failing (for SLOW: before answering)
    record: bool = False  # apply the call to AWS's state first, then fail
    operation: str | None = None  # e.g. "MeterUsage"; None: any API operation (UNPROCESSED: BatchMeterUsage's)

    def applies_to(self, operation: str) -> bool:
        if self.error == UNPROCESSED:  # nothing to hold back elsewhere: other operations pass it by
            return operation == BATCH_METER_USAGE
        return self.operation is None or self.operation == operation

    def failure(self) -> AwsError | None:
        """What the call ends in once the fault's delay is over; None: the normal answer (or,
        UNPROCESSED, the answer with records held back)."""
        return None if self.error in (SLOW, UNPROCESSED) else AwsError(self.error, self.message, self.status)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_fault(
    error: str,
    count: int = 1,
    *,
    message: str = DEFAULT_MESSAGE,
    status: int | None = None,
    delay: float = 0.0,
    record: bool = False,
    operation: str | None = None,
) -> Fault:
    """A checked Fault; ValueError for one that cannot happen.

    ``record`` goes only with what can follow a recorded call: a 5xx, DROP,
    SLOW or UNPROCESSED. AWS never records a request and then refuses it with a
    4xx. UNPROCESSED is BatchMeterUsage's alone (its status is not used).
    """
    if status is None:
        status = 500 if error == "InternalServiceErrorException" else 400
    if not isinstance(error, str):
        raise ValueError("error must be a string: an AWS error code, '' (bare status), 'drop' or 'slow'")
    if not rules.is_int(count) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not rules.is_int(status) or not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status, got {status!r}")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < 3600:
        raise ValueError(f"delay must be 0 to 3600 seconds, got {delay!r}")
    if not isinstance(record, bool):
        raise ValueError(f"record must be true or false, got {record!r}")
    if record and error not in (DROP, SLOW, UNPROCESSED) and status < 500:
        raise ValueError(
            f"record=True needs a 5xx status, DROP, SLOW or UNPROCESSED (AWS never records and then answers {status})"
        )
    if operation is not None and (not isinstance(operation, str) or not operation):
        raise ValueError(f"operation must be an operation name like 'MeterUsage', got {operation!r}")
    if error == UNPROCESSED and operation not in (None, BATCH_METER_USAGE):
        raise ValueError(f"{UNPROCESSED} is a fault of {BATCH_METER_USAGE} only, not of {operation}")
    return Fault(error, count, str(message), status, float(delay), record, operation)


def fault_from_json(body: Mapping[str, Any]) -> Fault:
    """The fault of a ``POST /_local/faults`` body."""
    if not isinstance(body, Mapping) or "error" not in body:
        raise ValueError('a fault needs at least {"error": ...}')
    unknown = set(body) - {"error", "count", "message", "status", "delay", "record", "operation"}
    if unknown:
        raise ValueError(f"unknown fault fields: {sorted(unknown)}")
    return make_fault(
        body["error"],
        body.get("count", 1),
        message=str(body.get("message", "injected")),
        status=body.get("status"),
        delay=body.get("delay", 0.0),
        record=body.get("record", False),
        operation=body.get("operation"),
    )


class Faults:
    """The faults still to come, in order; each call takes the first that applies to it."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._queue.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def take(self, operation: str) -> Fault | None:
        """The fault for one call of ``operation``, counted off; None: no fault."""
        with self._lock:
            for fault in self._queue:
                if fault.applies_to(operation):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._queue.remove(fault)
                    return fault
            return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._queue)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def __iter__(self) -> Iterator[Fault]:
        return iter(self.pending())
