"""Waiting for a deployment run: decided by the files the ServerApp writes and the run's status,
never by whether the log stream stayed connected."""

import pytest

from fed_distill.errors import FlowerError
from fed_distill.federated.flower.submit import FAILED_FILE, await_run


def _never():
    return None


def test_results_written_while_waiting_end_the_wait(tmp_path):
    calls = []

    def status():  # the ServerApp writes results.json while the run is still "running"
        calls.append(1)
        if len(calls) == 2:
            (tmp_path / "results.json").write_text("{}")
        return "running"

    await_run(tmp_path, status, _never, timeout_s=30, poll_s=0.01)
    assert len(calls) == 2


def test_a_dropped_status_answer_is_asked_again(tmp_path):
    answers = iter([None, None, "running", None, "finished:completed"])

    def status():
        state = next(answers)
        if state == "finished:completed":
            (tmp_path / "results.json").write_text("{}")
        return state

    await_run(tmp_path, status, _never, timeout_s=30, poll_s=0.01)


@pytest.mark.parametrize(
    "setup, status, alive, message",
    [
        (
            lambda d: (d / FAILED_FILE).write_text("FlowerError: only 1 of 2 SuperNodes\n"),
            "running",
            None,
            "the Flower run failed: FlowerError: only 1 of 2 SuperNodes",
        ),
        (lambda d: None, "finished:failed", None, r"ended \(finished:failed\) without results"),
        (
            lambda d: None,
            "running",
            "the SuperLink exited (1) before the run finished",
            r"the SuperLink exited \(1\)",
        ),
        (lambda d: None, "running", None, "did not finish within 0.05s"),
    ],
)
def test_failures_are_one_clear_error_naming_the_logs(tmp_path, setup, status, alive, message):
    setup(tmp_path)
    with pytest.raises(FlowerError, match=message) as err:
        await_run(tmp_path, lambda: status, lambda: alive, timeout_s=0.05, poll_s=0.01)
    assert "\n" not in str(err.value) and str(tmp_path / "flower_logs") in str(err.value)
