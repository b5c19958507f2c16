"""The suite catches real bugs: each fault of tests/faults.py, put into the production code,
makes every test it names fail on an assertion (an oracle disagreeing), not on an error.

Each fault runs its tests in a pytest of its own (the plugin in tests/faults.py patches the code
for that run only), so no bug leaks into the rest of the suite. A fault whose tests all still
pass is a bug the suite would ship: this test fails and names it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults import FAULTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_the_suite_catches(name, tmp_path):
    fault = FAULTS[name]
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-p", "tests.faults",
         "--fault", name, "--fault-report", str(report), *fault.caught_by],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert report.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    outcomes = json.loads(report.read_text())
    assert set(outcomes) == set(fault.caught_by), f"not every named test ran:\n{run.stdout[-3000:]}"
    for test, phases in outcomes.items():
        assert "setup" not in phases and "teardown" not in phases, f"{test} broke outside the test: {phases}"
        assert phases["call"] == {"outcome": "failed", "error": "AssertionError"}, (
            f"{fault.what}: {test} did not catch it ({phases['call']})\n{run.stdout[-3000:]}")
