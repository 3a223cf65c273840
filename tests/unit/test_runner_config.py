"""A projection runner's tuning comes from the PROJECTION_* settings in one frozen value."""

from __future__ import annotations

import dataclasses

import pytest

from backend.config import Settings
from projections.runner import RunnerConfig


def test_every_projection_setting_reaches_the_runner() -> None:
    settings = Settings(projection_batch_size=7, projection_poll_s=0.3, projection_standby_retry_s=0.4,
                        projection_max_backoff_s=5.0, projection_idle_checkpoint_s=0.1,
                        projection_apply_interval_s=0.05)
    assert RunnerConfig.from_settings(settings) == RunnerConfig(
        batch_size=7, poll_s=0.3, standby_retry_s=0.4, max_backoff_s=5.0, idle_checkpoint_s=0.1,
        apply_interval_s=0.05)


def test_the_config_cannot_change_under_a_running_runner() -> None:
    config = RunnerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 1  # type: ignore[misc]
