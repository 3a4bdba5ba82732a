"""`optuna-dashboard SWEEP/optuna.journal` (the dashboard extra) serves a finished search's
study: started on 127.0.0.1, asked for its studies and trials over HTTP, then stopped."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.test_reliability_sweeps import free_port, sweeper

# Found, not imported: importing the dashboard takes a second of every collection.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("optuna_dashboard") is None,
    reason="optuna-dashboard is not installed (pip install -e '.[dashboard]')",
)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_dashboard_serves_the_trials_of_a_finished_search(tmp_path):
    import optuna

    from vitexp.studies import open_storage

    journal = tmp_path / "optuna.journal"
    sweeper(tmp_path, n_trials=2, storage=str(journal)).sweep([])  # the sweeper's own journal study
    study = optuna.load_study(study_name="study", storage=open_storage(str(journal)))
    pruned = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    pruned.report(0.1, 1)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)

    command = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable)) or shutil.which(
        "optuna-dashboard"
    )
    assert command is not None, "the optuna-dashboard command is not installed beside optuna_dashboard"
    port = free_port()
    server = subprocess.Popen(
        [command, str(journal), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, f"optuna-dashboard exited: {server.stdout.read()[-2000:]}"
            try:
                studies = get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert time.time() < deadline, "optuna-dashboard did not answer in 60 s"
                time.sleep(0.3)
        (summary,) = studies
        assert summary["study_name"] == "study"
        detail = get(f"{base}/api/studies/{summary['study_id']}")
        trials = sorted(detail["trials"], key=lambda t: t["number"])
        assert [t["state"] for t in trials] == ["Complete", "Complete", "Pruned"]
        assert trials[2]["intermediate_values"] == [{"step": 1, "value": 0.1}]
    finally:
        server.terminate()
        server.wait(timeout=30)
