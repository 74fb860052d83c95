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

SaaS records (those naming a customer) go out in BatchMeterUsage calls of up to 25
(:mod:`gateway.recording.batches`), through :func:`gateway.metering.batch.batch_meter`,
and each is settled by its own status: Success → SENT; DuplicateRecord (another
quantity holds the customer's hour) → carried; CustomerNotSubscribed → FAILED, for an
operator to retry once the customer has an agreement; unprocessed → resent
identically. A call refused whole for a reason a resend cannot cure is split until
the bad record stands alone. Their window is AWS's SaaS window: 24 hours, and the
previous month only until 06:00 UTC on the 1st.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import structlog

from gateway.aws.backend import Backend, RetryPolicy
from gateway.aws.ratelimit import RateLimiter
from gateway.domain import errors, validation
from gateway.metering.batch import batch_meter
from gateway.metering.meter import meter
from gateway.observability import metrics
from gateway.recording import batches, placement
from gateway.recording.carried import log_carry, place_new_events
from gateway.recording.spool import RecordRow, Requeue, Spool, SpoolUnavailable


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
    {errors.Reason.DUPLICATE_REQUEST, errors.Reason.DUPLICATE_RECORD, errors.Reason.TIMESTAMP_OUT_OF_BOUNDS}
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
    if row.saas:  # BatchMeterUsage has no ClientToken: AWS knows the record by customer, dimension and hour
        who = row.customer_aws_account_id or row.customer_identifier
        return (
            f"outcome unknown after {row.attempts} attempt(s), {why}: AWS may hold {row.quantity} of "
            f"{row.usage_dimension} for customer {who} at {_iso(row.hour)}; reconcile with the seller's AWS "
            "usage reports, then `records retry ID --reconciled` if AWS does not hold it"
        )
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
        due = self.spool.due(now, self.grace, final=final)
        # Container records one MeterUsage each; SaaS records in BatchMeterUsage calls.
        units: list[list[RecordRow]] = [[row] for row in due if not row.saas]
        saas = [row for row in due if row.saas]
        if saas:
            hints = self.spool.product_hints([row.id for row in saas if not row.product_code])
            units += batches.batches(saas, hints)
        units.sort(key=lambda unit: (unit[0].hour, unit[0].id))
        for unit in units:
            if budget is not None and time.monotonic() - started > budget:
                log.warning("flush_budget_exhausted", budget_s=budget)
                break
            if not final and self._stop.is_set():
                break
            if not self.spool.leads():  # checked before every call: a pass may outlast the lead
                metrics.set_leader(False)
                break
            try:
                if unit[0].saas:
                    self._handle_batch(unit, result)
                else:
                    self._handle(unit[0], result)
            except SpoolUnavailable:
                break  # logged by the spool; the record is resent identically once it can write
            except Exception:  # one bad record must not end the pass for the others
                for row in unit:
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
        fields = self._fields(frozen)
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
        self._sent(frozen, outcome.metering_record_id, outcome.aws_request_id, fields, result)

    def _handle_batch(self, rows: list[RecordRow], result: TickResult) -> None:
        """One BatchMeterUsage call for SaaS records of one product (or license): those
        whose hour has left AWS's window are carried first, as in :meth:`_handle`."""
        now = self._now()
        earliest = placement.earliest_hour(now, self.margin, self.spool.span, saas=True)
        sendable = []
        for row in rows:
            if row.hour < earliest and (
                not row.outcome_unknown or not placement.still_accepted(row.hour, now, saas=True)
            ):
                self._carry(row, "saas_window", now, result)
            else:
                sendable.append(row)
        if sendable:
            self._send_batch(sendable, result)

    def _send_batch(self, rows: list[RecordRow], result: TickResult) -> None:
        """Send ``rows`` in one call and settle each by its status. A call AWS (or the
        gateway's own check) refuses whole, for a reason a resend cannot cure, is split
        in two and each half sent alone, so one bad record (an unknown license, say)
        holds back no other: nothing of a refused call was recorded. The spool is
        written once for the call's start, once for its sent records and once for those
        to resend (the rest, rare, one by one)."""
        self.limiter.acquire(self._sleep)  # the token first, as in _handle
        frozen = self.spool.begin_attempts([row.id for row in rows])  # committed before AWS hears of them
        if not frozen:
            return
        request = batches.build_batch(frozen)
        now = self._now()
        calls = 0

        @contextmanager
        def rate_limited() -> Iterator[None]:
            """Resends of unprocessed records are calls too: each after the first takes a token."""
            nonlocal calls
            calls += 1
            if calls > 1:
                self.limiter.acquire(self._sleep)
            yield

        try:
            structlog.contextvars.clear_contextvars()
            outcome = batch_meter(
                self.backend,
                request,
                validation.Window.for_saas(datetime.fromtimestamp(now, UTC), self.future_skew),
                deadline=time.monotonic() + self.call_timeout,
                what="hourly SaaS records",
                guard=rate_limited,
            )
        except errors.GatewayError as exc:
            if len(frozen) > 1 and disposition(exc) != RETRY and batches.record_caused(exc):
                self._isolate(frozen, exc, result)
            else:
                self._settle_call([(row, exc) for row in frozen], result)
            return
        finally:
            structlog.contextvars.clear_contextvars()
        sent: list[tuple[RecordRow, str]] = []
        refused: list[tuple[RecordRow, errors.GatewayError]] = []
        for answer in outcome.results:
            failure = batches.status_error(answer.status, outcome.aws_request_id)
            if failure is None:
                sent.append((frozen[answer.index], answer.metering_record_id))
            else:
                refused.append((frozen[answer.index], failure))
        refused += [(frozen[i], batches.unprocessed(request_id=outcome.aws_request_id)) for i in outcome.unprocessed]
        if sent:
            made = self.spool.mark_all_sent([(row.id, record_id) for row, record_id in sent], self._now())
            for (row, record_id), newly in zip(sent, made, strict=True):
                self._count_sent(row, record_id, outcome.aws_request_id, newly, result)
        self._settle_call(refused, result)

    def _isolate(self, frozen: list[RecordRow], exc: errors.GatewayError, result: TickResult) -> None:
        """A call refused whole: nothing of it was kept. Each half goes again on its own."""
        for row in frozen:
            self.spool.settle(row.id, uncertain=_SETTLE[exc.delivery])
        log.warning(
            "batch_refused_isolating",
            reason=exc.reason,
            error=exc.message,
            records=len(frozen),
            product_code=frozen[0].product_code or frozen[0].license_arn,
        )
        half = len(frozen) // 2
        for part in (frozen[:half], frozen[half:]):
            if self._stop.is_set() or not self.spool.leads():
                return  # settled above: the records wait, PENDING, for the next pass (or leader)
            fresh = [r for r in (self.spool.get(row.id) for row in part) if r is not None]
            if fresh:
                self._send_batch(fresh, result)

    def _settle_call(self, refused: list[tuple[RecordRow, errors.GatewayError]], result: TickResult) -> None:
        """The records of one call that AWS did not take: those a resend may settle go
        back in the queue together (one transaction, one log line a reason); the others
        (carried, failed) one by one."""
        retries: list[Requeue] = []
        reasons: dict[str, int] = {}
        for row, exc in refused:
            if disposition(exc) != RETRY:
                self._refused(row, exc, self._fields(row), result)
                continue
            uncertain = _SETTLE[exc.delivery]
            unknown = uncertain is True or (uncertain is None and bool(row.uncertain))
            error = f"{exc.reason}: {exc.message}"
            if unknown:  # say so where operators look: the listing
                error = f"outcome unknown, resending identically: {error}"
            delay = RetryPolicy(base=max(self.interval, 0.05), cap=BACKOFF_CAP).hint(row.attempts)
            retries.append(Requeue(row.id, uncertain, error, self._now() + delay))
            metrics.record_retried(exc.reason)
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
        if not retries:
            return
        self.spool.requeue(retries)
        result.retried += len(retries)
        first = refused[0][0]
        for reason, count in reasons.items():
            log.warning(
                "records_retry",
                reason=reason,
                records=count,
                product_code=first.product_code or first.license_arn,
                hour=_iso(first.hour),
            )

    @staticmethod
    def _fields(row: RecordRow) -> dict[str, object]:
        """A record's fields in its log lines (a customer's ids are no secret)."""
        fields: dict[str, object] = {
            "product_code": row.product_code,
            "usage_dimension": row.usage_dimension,
            "hour": _iso(row.hour),
            "quantity": row.quantity,
            "attempt": row.attempts,
            "client_token": row.client_token,
        }
        if row.saas:
            fields |= {
                "customer_aws_account_id": row.customer_aws_account_id,
                "license_arn": row.license_arn,
                "customer_identifier": row.customer_identifier,
            }
        return fields

    def _sent(
        self,
        row: RecordRow,
        metering_record_id: str,
        request_id: str | None,
        fields: dict[str, object],
        result: TickResult,
    ) -> None:
        newly = self.spool.mark_sent(row.id, metering_record_id, self._now())
        self._count_sent(row, metering_record_id, request_id, newly, result, fields)

    def _count_sent(
        self,
        row: RecordRow,
        metering_record_id: str,
        request_id: str | None,
        newly: bool,
        result: TickResult,
        fields: dict[str, object] | None = None,
    ) -> None:
        """Counted once, by the sender whose answer made it SENT: two senders may hear one OK."""
        fields = self._fields(row) if fields is None else fields
        if newly:
            result.sent += 1
            metrics.record_sent(row.product_code, row.usage_dimension, row.quantity)
        else:
            fields["already"] = True
        log.info("record_sent", metering_record_id=metering_record_id, aws_request_id=request_id, **fields)

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
