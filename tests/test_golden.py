"""The model's numbers pinned across refactors: the first 5 training losses of the smoke configs and of a
(2, 2, 2)-mesh run on 8 fake devices, recorded before the FFN-kind / router registry refactor
(tests/golden/record_losses.py wrote tests/golden/smoke_losses.json), must be reproduced to 1e-6."""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "golden"))

import record_losses  # noqa: E402

with open(os.path.join(HERE, "golden", "smoke_losses.json")) as f:
    GOLDEN = json.load(f)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_first_losses_unchanged(name):
    losses = record_losses.losses_of(name)
    assert len(losses) == len(GOLDEN[name]) == record_losses.STEPS
    assert max(abs(a - b) for a, b in zip(losses, GOLDEN[name])) <= 1e-6, (name, losses, GOLDEN[name])
