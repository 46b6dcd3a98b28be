import math

import pytest

from regrow.core.schedules import UpdateSchedule


def test_update_steps_every_interval_until_stop():
    s = UpdateSchedule(total_steps=1000, interval=100, stop_fraction=0.75)
    assert list(s.update_steps()) == [100, 200, 300, 400, 500, 600, 700]
    assert [t for t in range(1, 1001) if s.is_update(t)] == list(s.update_steps())


def test_cosine_decays_from_alpha_to_zero():
    s = UpdateSchedule(total_steps=1000, interval=100, drop_fraction=0.3, schedule="cosine")
    assert s.fraction(0) == pytest.approx(0.3)
    assert s.fraction(375) == pytest.approx(0.15)
    assert s.fraction(750) == pytest.approx(0.0, abs=1e-12)
    assert s.fraction(100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 100 / 750)))


def test_linear_and_constant():
    lin = UpdateSchedule(total_steps=100, interval=10, drop_fraction=0.4, schedule="linear", stop_fraction=1.0)
    assert lin.fraction(50) == pytest.approx(0.2)
    const = UpdateSchedule(total_steps=100, interval=10, drop_fraction=0.4, schedule="constant")
    assert const.fraction(70) == 0.4


@pytest.mark.parametrize("kwargs, message", [
    ({"total_steps": 0}, "total_steps"),
    ({"total_steps": 10, "interval": 0}, "update_interval"),
    ({"total_steps": 10, "drop_fraction": 0.0}, "drop_fraction"),
    ({"total_steps": 10, "stop_fraction": 1.5}, "stop_fraction"),
    ({"total_steps": 10, "schedule": "exp"}, "cosine, constant, linear"),
])
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UpdateSchedule(**kwargs)
