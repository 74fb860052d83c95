"""Sidecar mode (``--register-usage``): the pod is not ready until RegisterUsage succeeds.

Health says NOT_SERVING for every name while the registration runs in the
background; once it succeeds, every name turns SERVING but the recorder, which
follows its spool as always (its state is remembered meanwhile, never shown
early). A final refusal ends the process at once with one line on stderr and
exit status :data:`EXIT_REFUSED`: the buyer may not run this container, so there
is nothing to drain. Once SIGTERM has come (``stop``), no further attempt is made
and no outcome touches the process: the drain that has begun runs to its end.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import structlog

from gateway.aws.backend import RetryPolicy
from gateway.aws.registration import Registrar, RegistrationAbandoned, RegistrationRefused, load_public_key
from gateway.config import Settings
from gateway.rpc.server import RECORDER_SERVICE, Gateway

if TYPE_CHECKING:
    from mypy_boto3_meteringmarketplace import MarketplaceMeteringClient

# Not 1 (a crash) nor 2 (a setting refused at start-up): the buyer may not run this container.
EXIT_REFUSED = 3

log = structlog.get_logger("gateway")


def _exit_now(code: int) -> NoReturn:
    """End the process from the registration thread: flushed, no drain, no interpreter shutdown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Sidecar:
    """RegisterUsage at start-up, and readiness held until it succeeds."""

    def __init__(
        self,
        settings: Settings,
        client: MarketplaceMeteringClient,
        *,
        exit_process: Callable[[int], NoReturn] = _exit_now,
        registrar: Registrar | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._stop = stop or threading.Event()  # SIGTERM's: the backoff wakes on it, and no outcome acts after it
        # The key file is read now, before anything serves: a bad one is a one-line ConfigError.
        key = load_public_key(settings.register_usage_public_key) if settings.register_usage_public_key else None
        policy = RetryPolicy(settings.aws_max_attempts, settings.aws_backoff_base, settings.aws_backoff_max)
        self.registrar = registrar or Registrar(
            client,
            settings.register_usage,
            settings.register_usage_key_version,
            key,
            policy,
            sleep=self._stop.wait,
            stopped=self._stop.is_set,
        )
        self._exit = exit_process
        self._lock = threading.Lock()
        self._gateway: Gateway | None = None
        self._registered = False
        self._spool_writable: bool | None = None  # None: no spool, or not heard of yet
        self.thread: threading.Thread | None = None

    def start(self, gateway: Gateway) -> None:
        """Register in the background; ``gateway`` was started with ``ready=False``."""
        self._gateway = gateway
        self.thread = threading.Thread(target=self._run, name="register-usage", daemon=True)
        self.thread.start()

    def recorder_health(self, writable: bool) -> None:
        """The recorder's spool health (``Recording.watch_health``): shown only once registered."""
        with self._lock:
            self._spool_writable = writable
            if self._registered and self._gateway is not None:
                self._gateway.set_serving(RECORDER_SERVICE, writable)

    def _run(self) -> None:
        try:
            outcome = self.registrar.register()
        except RegistrationAbandoned as abandoned:
            log.info("register_usage_abandoned", attempts=abandoned.attempts, note="SIGTERM came first")
            return
        except RegistrationRefused as refused:
            log.error("register_usage_refused", cause=refused.cause, message=refused.line)
            if self._stop.is_set():  # the pod is stopping already: let its drain finish
                return
            print(refused.line, file=sys.stderr)
            self._exit(EXIT_REFUSED)
            return
        except Exception as exc:  # a bug must not leave the pod unready for ever without a word
            line = f"metering-gateway: RegisterUsage failed unexpectedly: {type(exc).__name__}: {exc}"
            log.exception("register_usage_failed")
            if self._stop.is_set():
                return
            print(" ".join(line.split()), file=sys.stderr)
            self._exit(EXIT_REFUSED)
            return
        assert self._gateway is not None
        with self._lock:
            if self._stop.is_set():  # health is NOT_SERVING for the drain: it stays so, metrics too
                log.info("registered_while_stopping", attempts=outcome.attempts)
                return
            self._registered = True
            for name in self._gateway.names:
                serving = (
                    self._spool_writable if name == RECORDER_SERVICE and self._spool_writable is not None else True
                )
                self._gateway.set_serving(name, serving)
        log.info(
            "registered",
            product_code=self.registrar.product_code,
            public_key_version=self.registrar.key_version,
            nonce=outcome.nonce,
            verified=outcome.verified,
            attempts=outcome.attempts,
            aws_request_id=outcome.aws_request_id,
            status="SERVING",
        )
