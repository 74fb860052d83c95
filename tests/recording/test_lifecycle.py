"""What open_recording derives from the settings: how long one record lasts."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.config import Settings
from gateway.domain.clock import HOUR
from gateway.recording.lifecycle import record_span


@pytest.mark.parametrize(
    ("agentcore", "interval", "span"),
    [(False, 30.0, HOUR), (False, 0.2, HOUR), (True, 30.0, 30), (True, 0.2, 1), (True, 90.4, 90)],
)
def test_a_record_lasts_an_hour_or_in_agentcore_mode_one_flush_interval(
    agentcore: bool, interval: float, span: int
) -> None:
    settings = dataclasses.replace(Settings(), agentcore=agentcore, flush_interval=interval)
    assert record_span(settings) == span
