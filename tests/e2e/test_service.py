"""A coordinator that stays up: jobs submitted to a running ``weckd-server --service`` run in order across the
same site processes, ``weckd status --json`` shows the queue and then the finished jobs, ``weckd compare``
sets the chain beside the sites-alone baseline. (The federation of ``hetero_weights_run``.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from .conftest import FederatedRun

pytestmark = pytest.mark.slow


def test_jobs_submitted_while_a_chain_runs_complete_in_order(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None and hetero_weights_run.server_rc == 0  # stopped (SIGTERM) while idle: exit 0
    first, second, third = svc.jobs
    assert svc.during["coordinator_running"] and svc.during["running"]["id"] == second
    assert [j["id"] for j in svc.during["queue"]] == [third]
    assert [(j["id"], j["status"]) for j in svc.during["recent"]] == [(first, "completed")]
    done = svc.final["recent"][::-1]  # newest first in status
    assert [j["id"] for j in done] == svc.jobs and svc.final["queue"] == [] and svc.final["running"] is None
    assert [j["status"] for j in done] == ["completed"] * 3 and not svc.final["coordinator_running"]
    for before, after in zip(done, done[1:]):
        assert before["finished"] <= after["started"]  # one after another, in submission order
    assert all(done[0]["started"] < j["submitted"] < done[0]["finished"] for j in done[1:])  # while the first ran
    assert len({j["chain_run"] for j in done}) == 3 and [j["chain_run"] for j in done] == sorted(
        j["chain_run"] for j in done)  # each job its own chain run id, later ones sorting later (the sites' rule)
    assert all(isinstance(j["summary"]["delivered_accuracy"], float) for j in done)


def test_the_sites_served_every_job_without_a_restart(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None and svc.sites_alive == {f"weckd-client-{s}": True for s in ("A", "B", "C")}
    for site in ("A", "B", "C"):
        log = (hetero_weights_run.scaffold.root / "logs" / f"weckd-client-{site}.log").read_text()
        assert log.count("connected to the coordinator") == 1  # joined once, served three runs
        ledger = json.loads((hetero_weights_run.scaffold.root / "state" / f"site-{site}" / "runs.json").read_text())
        assert sorted(ledger["runs"]) == sorted(j["chain_run"] for j in svc.final["recent"])


def test_each_job_runs_its_own_config_and_kind(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None
    out = hetero_weights_run.scaffold.root / "out"
    runs = {r["job"]["name"]: r for r in (json.loads((out / job / "results.json").read_text()) for job in svc.jobs)}
    assert {name: r["job"]["kind"] for name, r in runs.items()} == {"first": "chain", "second-chain": "chain",
                                                                   "sites-alone": "local"}
    first, chain, alone = runs["first"], runs["second-chain"], runs["sites-alone"]
    assert [len(link["epochs"]) for link in first["links"]] == [2, 2, 2]  # the coordinator's --set reaches job 1
    for run in (chain, alone):  # the jobs' overrides: one architecture, one epoch, every site evaluates every link
        assert [link["arch"] for link in run["links"]] == ["test_resnet"] * 3
        assert [len(link["epochs"]) for link in run["links"]] == [1, 1, 1]
        assert all(sorted(link["evaluations"]) == ["A", "B", "C"] for link in run["links"])
    assert [link["init"] for link in chain["links"]] == ["scratch", "predecessor", "predecessor"]
    assert all(link["epochs"][-1]["kd"] > 0 for link in chain["links"][1:])  # the chain distils
    assert [link["init"] for link in alone["links"]] == ["scratch"] * 3  # each site alone: no hand-over
    assert all(link["epochs"][-1]["kd"] == 0 for link in alone["links"])  # and no teacher
    # a completed job keeps no relay blobs in the coordinator's state (its model is in its output folder)
    jobs = hetero_weights_run.scaffold.root / "state" / "server" / "jobs"
    assert not list(jobs.glob("*/**/relay-*.bin"))


def test_compare_sets_the_jobs_side_by_side(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None
    lines = svc.compare.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["first"], ["second-chain"],
                                                                                    ["sites-alone"])}
    assert set(rows) == {"first", "second-chain", "sites-alone"}
    assert rows["sites-alone"][1] == "local" and rows["second-chain"][1] == "chain"
    header = next(line for line in lines if line.startswith("job")).split()
    pooled = header.index("pooled")
    for name in ("second-chain", "sites-alone"):
        assert 0.0 <= float(rows[name][pooled]) <= 100.0
    with Image.open(svc.plot) as im:
        assert im.size[0] > 200 and im.size[1] > 200
    assert Path(svc.plot).stat().st_size > 5000


def test_every_job_is_tracked_in_a_real_mlflow_server(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None
    runs = svc.tracked
    assert sorted(r["tags"]["weckd.job"] for r in runs) == sorted(svc.jobs)  # each job logged once
    by_name = {r["name"]: r for r in runs}
    assert {n: r["tags"]["weckd.kind"] for n, r in by_name.items()} == {"first": "chain", "second-chain": "chain",
                                                                       "sites-alone": "local"}
    assert all(r["status"] == "FINISHED" for r in runs)
    assert [by_name[n]["params"]["link.epochs"] for n in ("first", "second-chain", "sites-alone")] == ["2", "1", "1"]
    assert by_name["sites-alone"]["params"]["link.init"] == "scratch"
    assert by_name["second-chain"]["params"]["federation.evaluate"] == "all"
    for run in runs:
        job = run["tags"]["weckd.job"]
        results = json.loads((hetero_weights_run.scaffold.root / "out" / job / "results.json").read_text())
        assert [step for step, _ in run["metrics"]["val_accuracy"]] == [1, 2, 3]  # step = link
        assert [v for _, v in run["metrics"]["val_accuracy"]] == pytest.approx(
            [link["val"]["accuracy"] for link in results["links"]])
        assert {"results.json", "config.effective.yaml", "model"} <= set(run["artifacts"])
        assert "sealed" not in run["artifacts"]  # sealed for the coordinator and A: the coordinator's copy is model/
        assert "model/model.safetensors" in run["model"]
    assert [s for s, _ in by_name["second-chain"]["metrics"]["accuracy_site_C"]] == [1, 2, 3]  # all sites scored all
