"""The sender: a background thread that meters closed hourly records to AWS.

Every ``interval`` it places new events into records (:meth:`Spool.assign`);
then, when this process is the spool's one sender (:meth:`Spool.leads`), it
sends each PENDING record whose hour closed ``grace`` ago through the same path
as MeteringService (validate → ``params.to_aws`` → ``Backend.meter_usage``), at
most ``max_rps`` calls a second, and now and then prunes the spool. What
happens to a record depends only on the answer's reason (:func:`disposition`)
and on what the answer says about delivery (the error table's
:class:`gateway.domain.errors.Delivery`):

- OK → SENT, with AWS's record id.
- retryable (throttling, AWS down, credentials missing) → stays PENDING, tried
  again after a backoff with the *same* request and ClientToken.
- the hour cannot take it (DUPLICATE_REQUEST: someone else's record holds the
  hour; TIMESTAMP_OUT_OF_BOUNDS) → carried into the next hour that can.
- anything else → FAILED with the error; the record stays listed.

Unknown means unknown: once an attempt may have been recorded unheard (an AWS
5xx other than a bare 503, a read timeout, a dropped connection, a crash
mid-call), the record is only ever resent identically, until an answer settles
it or its hour leaves AWS's six-hour window; then it is FAILED "outcome unknown"
for reconciliation. It is never carried: that could bill it twice.

A PENDING record whose hour is about to leave AWS's six-hour window (an outage)
and whose outcome is known is carried forward before AWS refuses it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import structlog

from gateway.aws.backend import Backend, RetryPolicy
from gateway.aws.ratelimit import RateLimiter
from gateway.domain import errors, validation
from gateway.metering.meter import meter
from gateway.observability import metrics
from gateway.recording import placement
from gateway.recording.carried import log_carry, place_new_events
from gateway.recording.spool import RecordRow, Spool, SpoolUnavailable


class Disposition(StrEnum):
    """What the sender does with a record AWS refused (:func:`disposition`)."""

    RETRY = "retry"  # the same request again, later
    CARRY = "carry"  # its hour is unusable: its usage goes to a later hour
    FAIL = "fail"  # FAILED, for an operator


RETRY, CARRY, FAIL = Disposition.RETRY, Disposition.CARRY, Disposition.FAIL
# Conditions that block sending without saying anything about the record itself:
# an operator can fix them, so the usage waits (and is carried) instead of failing.
_WAIT_FOR_FIX: frozenset[errors.Reason] = frozenset(
    {
        errors.Reason.NO_CREDENTIALS,
        errors.Reason.UNAUTHORIZED,
        errors.Reason.ACCESS_DENIED,
        errors.Reason.DEADLINE_EXCEEDED,
        errors.Reason.INVALID_ENDPOINT_REGION,
        errors.Reason.DISABLED_API,
        *errors.CREDENTIALS_REFUSED,
    }
)
_HOUR_UNUSABLE: frozenset[errors.Reason] = frozenset(
    {errors.Reason.DUPLICATE_REQUEST, errors.Reason.TIMESTAMP_OUT_OF_BOUNDS}
)
# What settle() records for each kind of answer (see Spool.settle).
_SETTLE = {errors.REFUSED: None, errors.ABSENT: False, errors.UNKNOWN: True}
STATS_EVERY = 60.0  # seconds between spool_stats lines
PRUNE_EVERY = 600.0  # seconds (on the sender's clock) between pruning passes
BACKOFF_CAP = 300.0

log = structlog.get_logger("gateway.sender")


def disposition(error: errors.GatewayError) -> Disposition:
    """What to do with a record AWS (or the transport) refused with ``error``.

    An answer that leaves the outcome unknown is always resent: only the identical
    request can settle it, whatever its status code.
    """
    if error.reason in _HOUR_UNUSABLE:
        return CARRY
    if error.retryable or error.reason in _WAIT_FOR_FIX or error.delivery is errors.UNKNOWN:
        return RETRY
    return FAIL


@dataclass
class TickResult:
    sent: int = 0
    retried: int = 0
    carried: int = 0
    failed: int = 0


def _iso(hour: int) -> str:
    return placement.timestamp_of(hour).isoformat()


def _finished(thread: threading.Thread, deadline: float) -> bool:
    """Join ``thread`` until ``deadline`` (monotonic); whether it ended."""
    thread.join(max(0.0, deadline - time.monotonic()))
    return not thread.is_alive()


def _outcome_unknown(row: RecordRow, why: str) -> str:
    """``last_error`` of a record failed while AWS may hold it: what to reconcile."""
    return (
        f"outcome unknown after {row.attempts} attempt(s), {why}: AWS may hold {row.quantity} for "
        f"{_iso(row.hour)} (ClientToken {row.client_token}); reconcile with the seller's AWS usage reports"
    )


class Sender:
    """Start with :meth:`start`; :meth:`stop` ends the loop (and can flush)."""

    def __init__(
        self,
        spool: Spool,
        backend: Backend,
        *,
        interval: float,
        grace: float,
        max_rps: float,
        future_skew: timedelta = timedelta(minutes=5),
        margin: float = placement.SAFETY_MARGIN,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        call_timeout: float = 30.0,
        event_retention: float,
        record_retention: float,
        zero_hours: Mapping[str, Collection[str]] | None = None,
        agentcore: bool = False,
    ) -> None:
        self.spool = spool
        self.agentcore = agentcore  # AgentCore Runtime's rules for every request (the spool's span cuts the time)
        # --zero-usage-hours: (product, dimension) pairs metered as zero in an hour without usage.
        self.zero_keys = sorted((p, d) for p, dims in (zero_hours or {}).items() for d in dims)
        self._zeros_done_for: int | None = None  # the open hour of the last fill: nothing closes until it does
        self.backend = backend
        self.interval = interval
        self.grace = grace
        self.margin = margin
        self.future_skew = future_skew
        self.limiter = RateLimiter(max_rps, clock=monotonic)  # ``sleep`` waits for its tokens
        self.call_timeout = call_timeout
        self._now = now
        self._sleep = sleep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_stats = float("-inf")
        self.event_retention = event_retention
        self.record_retention = record_retention
        self._last_prune = float("-inf")

    # -- the loop --------------------------------------------------------------

    def start(self) -> Sender:
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except SpoolUnavailable:
                pass  # logged by the spool; the next tick tries again
            except Exception:  # the loop must outlive any one bad tick
                log.exception("sender_tick_failed")
            if self._stop.wait(self.interval):
                return

    def request_stop(self) -> None:
        """End the loop after the record in hand; SIGTERM calls it at once, so the
        loop winds down while the server drains instead of after."""
        self._stop.set()

    def stop(self, *, flush: bool = False, budget: float = 10.0) -> TickResult | None:
        """End the loop; with ``flush``, also send every PENDING record up to the
        current, still open hour (one attempt each). Returns within ``budget``
        seconds whatever AWS does; None when it did not flush (or could not finish).

        A call still in flight when the budget runs out is abandoned, not waited
        for: its record was marked in flight (``begin_attempt`` commits before AWS
        hears of it), so the next start resends it identically, with the same
        ClientToken, exactly as after a crash mid-call.
        """
        deadline = time.monotonic() + budget
        self._stop.set()
        if self._thread is not None:
            if not _finished(self._thread, deadline):
                log.warning(
                    "sender_abandoned",
                    budget_s=round(budget, 3),
                    note="a call in flight is resent identically at the next start",
                )
                return None
            self._thread = None
        result: list[TickResult | None] = []

        def final() -> None:
            try:
                result.append(self.tick(final=True, budget=deadline - time.monotonic()) if flush else None)
                self.log_stats(force=True)
            except Exception:  # the spool may be unreachable: say so, the exit goes on
                log.exception("sender_stop_failed")

        last = threading.Thread(target=final, name="sender-final", daemon=True)
        last.start()
        if not _finished(last, deadline):
            log.warning(
                "flush_budget_exhausted" if flush else "sender_abandoned",
                budget_s=round(budget, 3),
                note="a call in flight is resent identically at the next start",
            )
            return None
        return result[0] if result else None

    # -- one pass --------------------------------------------------------------

    def tick(self, *, final: bool = False, budget: float | None = None) -> TickResult:
        """Place new events, then send what is due. Returns what happened."""
        started = time.monotonic()
        now = self._now()
        try:
            place_new_events(self.spool, now, self.margin)
            leading = self.spool.leads()
        except BaseException:
            metrics.set_leader(False)  # not known to lead: never a stale 1 while ticks fail
            raise
        result = TickResult()
        metrics.set_leader(leading)
        if not leading:
            return result  # another replica sends this spool's records
        if self.zero_keys:  # after placing: an hour that got usage gets no zero
            self.fill_zero_hours(now)
        for row in self.spool.due(now, self.grace, final=final):
            if budget is not None and time.monotonic() - started > budget:
                log.warning("flush_budget_exhausted", budget_s=budget)
                break
            if not final and self._stop.is_set():
                break
            if not self.spool.leads():  # checked before every record: a pass may outlast the lead
                metrics.set_leader(False)
                break
            try:
                self._handle(row, result)
            except SpoolUnavailable:
                break  # logged by the spool; the record is resent identically once it can write
            except Exception:  # one bad record must not end the pass for the others
                log.exception(
                    "record_handling_failed",
                    record_id=row.id,
                    product_code=row.product_code,
                    usage_dimension=row.usage_dimension,
                    hour=_iso(row.hour),
                )
        if not final:
            self.prune(now)
        self.log_stats()
        return result

    def fill_zero_hours(self, now: float) -> None:
        """Zero records for the closed hours without usage (--zero-usage-hours); sent
        like any other record, by the same pass."""
        open_hour = placement.hour_of(now)
        if open_hour == self._zeros_done_for:
            return  # no hour has closed since the last fill: it would find nothing to make
        filled = self.spool.fill_zero_hours(self.zero_keys, now, self.margin)
        self._zeros_done_for = open_hour
        for product, dimension, hour in filled.made:
            log.info("zero_hour_recorded", product_code=product, usage_dimension=dimension, hour=_iso(hour))
        for product, dimension, hours in filled.missed:
            log.warning(
                "zero_hours_missed",
                product_code=product,
                usage_dimension=dimension,
                hours=hours,
                note="closed hours without usage that left AWS's six-hour window before a sender could meter them",
            )

    def prune(self, now: float) -> None:
        """Every PRUNE_EVERY seconds of the sender's clock: keep the spool bounded."""
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        pruned = self.spool.prune(now, event_retention=self.event_retention, record_retention=self.record_retention)
        if pruned.events or pruned.records or pruned.taken:
            log.info("spool_pruned", events=pruned.events, records=pruned.records, taken_hours=pruned.taken)

    def _handle(self, row: RecordRow, result: TickResult) -> None:
        now = self._now()
        if row.hour < placement.earliest_hour(now, self.margin, self.spool.span):
            if not row.outcome_unknown or not placement.still_accepted(row.hour, now):
                self._carry(row, "six_hour_limit", now, result)
                return
            # Unknown outcome, hour still inside AWS's window: only the identical resend can settle it.
        # The token first: a crash while waiting must not leave the record marked in flight.
        self.limiter.acquire(self._sleep)
        frozen = self.spool.begin_attempt(row.id)  # committed before AWS hears of it
        if frozen is None:
            return
        request = placement.build_request(
            frozen.product_code,
            frozen.usage_dimension,
            frozen.hour,
            frozen.content,
            frozen.client_token,
            decimal=frozen.decimal,
        )
        fields = {
            "product_code": frozen.product_code,
            "usage_dimension": frozen.usage_dimension,
            "hour": _iso(frozen.hour),
            "quantity": frozen.quantity,
            "attempt": frozen.attempts,
            "client_token": frozen.client_token,
        }
        try:
            structlog.contextvars.clear_contextvars()
            outcome = meter(
                self.backend,
                request,
                validation.Window(datetime.fromtimestamp(now, UTC), self.future_skew),
                deadline=time.monotonic() + self.call_timeout,
                what="interval record" if self.agentcore else "hourly record",
                agentcore=self.agentcore,
            )
        except errors.GatewayError as exc:
            self._refused(frozen, exc, fields, result)
            return
        finally:
            structlog.contextvars.clear_contextvars()
        # Counted once, by the sender whose answer made it SENT: two senders may hear one OK.
        if self.spool.mark_sent(frozen.id, outcome.metering_record_id, self._now()):
            result.sent += 1
            metrics.record_sent(frozen.product_code, frozen.usage_dimension, frozen.quantity)
        else:
            fields["already"] = True
        log.info(
            "record_sent",
            metering_record_id=outcome.metering_record_id,
            aws_request_id=outcome.aws_request_id,
            **fields,
        )

    def _refused(self, row: RecordRow, exc: errors.GatewayError, fields: dict[str, object], result: TickResult) -> None:
        error = f"{exc.reason}: {exc.message}"
        self.spool.settle(row.id, uncertain=_SETTLE[exc.delivery])
        row = self.spool.get(row.id) or row
        fields["delivery"] = exc.delivery.value
        what = disposition(exc)
        if what == CARRY:
            log.warning("record_refused", reason=exc.reason, error=exc.message, then=CARRY, **fields)
            self._carry(row, exc.reason, self._now(), result)
        elif what == RETRY:
            delay = RetryPolicy(base=max(self.interval, 0.05), cap=BACKOFF_CAP).hint(row.attempts)
            if row.outcome_unknown:  # say so where operators look: the listing
                error = f"outcome unknown, resending identically: {error}"
            self.spool.retry_later(row.id, error, self._now() + delay)
            result.retried += 1
            metrics.record_retried(exc.reason)
            log.warning("record_retry", reason=exc.reason, error=exc.message, retry_in_s=round(delay, 3), **fields)
        else:
            if row.outcome_unknown:  # an earlier attempt may sit in AWS: say so, for reconciliation
                error = _outcome_unknown(row, f"then refused: {error}")
            if self.spool.mark_failed(row.id, error, self._now()):
                result.failed += 1
                metrics.record_failed(exc.reason, outcome_unknown=row.outcome_unknown)
            else:  # another sender settled it first (SENT stays SENT): nothing to count
                fields["already_settled"] = True
            log.error("record_failed", reason=exc.reason, error=exc.message, **fields)

    def _carry(self, row: RecordRow, reason: str, now: float, result: TickResult) -> None:
        if row.outcome_unknown:
            # An attempt may sit in AWS unheard; carrying would bill it twice. The record
            # stays listed for reconciliation against AWS's records of that hour.
            failed = self.spool.mark_failed(
                row.id, _outcome_unknown(row, f"not carried ({reason}), to avoid billing twice"), now
            )
            if failed:
                result.failed += 1
                metrics.record_failed(reason, outcome_unknown=True)
            log.error(
                "record_outcome_unknown",
                reason=reason,
                product_code=row.product_code,
                usage_dimension=row.usage_dimension,
                hour=_iso(row.hour),
                quantity=row.quantity,
                client_token=row.client_token,
                attempts=row.attempts,
                **({} if failed else {"already_settled": True}),
            )
            return
        for carry in self.spool.carry(row.id, reason, now, self.margin):
            log_carry(carry, reason)
        result.carried += 1

    def log_stats(self, *, force: bool = False) -> None:
        """The ``spool_stats`` line: pending records and the age of the oldest."""
        if not force and time.monotonic() - self._last_stats < STATS_EVERY:
            return
        self._last_stats = time.monotonic()
        stats = self.spool.stats()
        oldest = stats.oldest_pending_hour
        log.info(
            "spool_stats",
            pending_records=stats.pending,
            unassigned_events=stats.unassigned_events,
            oldest_pending_hour=None if oldest is None else _iso(oldest),
            oldest_pending_age_s=None if oldest is None else round(self._now() - oldest, 1),
        )
