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
    first, second, *waiting = svc.jobs
    assert svc.during["coordinator_running"] and svc.during["running"]["id"] == second
    assert [j["id"] for j in svc.during["queue"]] == waiting
    assert [(j["id"], j["status"]) for j in svc.during["recent"]] == [(first, "completed")]
    done = svc.final["recent"][::-1]  # newest first in status
    assert [j["id"] for j in done] == svc.jobs and svc.final["queue"] == [] and svc.final["running"] is None
    assert [j["status"] for j in done] == ["completed"] * 4 and not svc.final["coordinator_running"]
    for before, after in zip(done, done[1:]):
        assert before["finished"] <= after["started"]  # one after another, in submission order
    assert all(done[0]["started"] < j["submitted"] < done[0]["finished"] for j in done[1:])  # while the first ran
    assert len({j["chain_run"] for j in done}) == 4 and [j["chain_run"] for j in done] == sorted(
        j["chain_run"] for j in done)  # each job its own chain run id, later ones sorting later (the sites' rule)
    assert all(isinstance(j["summary"]["delivered_accuracy"], float) for j in done)


def test_the_sites_served_every_job_without_a_restart(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None and svc.sites_alive == {f"weckd-client-{s}": True for s in ("A", "B", "C")}
    for site in ("A", "B", "C"):
        log = (hetero_weights_run.scaffold.root / "logs" / f"weckd-client-{site}.log").read_text()
        assert log.count("connected to the coordinator") == 1  # joined once, served four runs
        ledger = json.loads((hetero_weights_run.scaffold.root / "state" / f"site-{site}" / "runs.json").read_text())
        assert sorted(ledger["runs"]) == sorted(j["chain_run"] for j in svc.final["recent"])


def test_each_job_runs_its_own_config_and_kind(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None
    out = hetero_weights_run.scaffold.root / "out"
    runs = {r["job"]["name"]: r for r in (json.loads((out / job / "results.json").read_text()) for job in svc.jobs)}
    assert {name: r["job"]["kind"] for name, r in runs.items()} == {"first": "chain", "second-chain": "chain",
                                                                   "sites-alone": "local", "fedavg": "fedavg"}
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
    fedavg = runs["fedavg"]  # 2 epochs a link → 2 rounds of one epoch at all 3 sites: the chain's 6 site-epochs
    assert fedavg["algorithm"] == {"name": "fedavg", "rounds": 2, "epochs_per_round": 1}
    assert [(link["site"], len(link["epochs"])) for link in fedavg["links"]] == [("all", 3), ("all", 3)]
    assert [link["init"] for link in fedavg["links"]] == ["scratch", "average"]  # round 2 from the average
    assert all(sorted(link["evaluations"]) == ["A", "B", "C"] for link in fedavg["links"])
    # a completed job keeps no relay blobs in the coordinator's state (its model is in its output folder)
    jobs = hetero_weights_run.scaffold.root / "state" / "server" / "jobs"
    assert not list(jobs.glob("*/**/relay-*.bin"))


def test_compare_sets_the_jobs_side_by_side(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None
    lines = svc.compare.splitlines()
    names = ("first", "second-chain", "sites-alone", "fedavg")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in [[n] for n in names]}
    assert set(rows) == set(names)
    assert [rows[n][1] for n in names[1:]] == ["chain", "local", "fedavg"]
    header = next(line for line in lines if line.startswith("job")).split()
    pooled = header.index("pooled")
    for name in names[1:]:
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
                                                                       "sites-alone": "local", "fedavg": "fedavg"}
    assert all(r["status"] == "FINISHED" for r in runs)
    assert [by_name[n]["params"]["link.epochs"] for n in ("first", "second-chain", "sites-alone")] == ["2", "1", "1"]
    assert by_name["sites-alone"]["params"]["link.init"] == "scratch"
    assert by_name["second-chain"]["params"]["federation.evaluate"] == "all"
    for run in runs:
        job = run["tags"]["weckd.job"]
        results = json.loads((hetero_weights_run.scaffold.root / "out" / job / "results.json").read_text())
        steps = list(range(1, len(results["links"]) + 1))  # step = link (FedAvg: round)
        assert [step for step, _ in run["metrics"]["val_accuracy"]] == steps
        assert [v for _, v in run["metrics"]["val_accuracy"]] == pytest.approx(
            [link["val"]["accuracy"] for link in results["links"]])
        assert {"results.json", "config.effective.yaml", "model"} <= set(run["artifacts"])
        assert "sealed" not in run["artifacts"]  # sealed for the coordinator and A: the coordinator's copy is model/
        assert "model/model.safetensors" in run["model"]
    assert [s for s, _ in by_name["second-chain"]["metrics"]["accuracy_site_C"]] == [1, 2, 3]  # all sites scored all


def _audit(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_fedavg_runs_at_the_sites_under_their_own_policy_and_keys(hetero_weights_run: FederatedRun) -> None:
    svc = hetero_weights_run.service
    assert svc is not None
    root, job = hetero_weights_run.scaffold.root, svc.jobs[3]
    run_id = json.loads((root / "out" / job / "results.json").read_text())["run_id"]
    for site in ("A", "B", "C"):
        ledger = json.loads((root / "state" / f"site-{site}" / "runs.json").read_text())["runs"][run_id]
        assert (ledger["kind"], ledger["links"], ledger["routed"]) == ("fedavg", [0, 1], ["A", "B", "C"])
        taken = [(e["link"], e["sender"]) for e in _audit(root / "state" / f"site-{site}" / "audit.log")
                 if e["event"] == "fedavg-train" and e["run"] == run_id and e["decision"] == "accepted"]
        assert taken == [(0, ""), (1, "coordinator")]  # round 2 from the coordinator's average, opened under its key
        sent = [e["sent_to"] for e in _audit(root / "state" / f"site-{site}" / "audit.log")
                if e["event"] == "fedavg-train-reply" and e["run"] == run_id]
        assert sent == [["coordinator"], ["coordinator"]]
    # sealed for the coordinator and A (federation.sealing.deliver_to): A keeps the final average, B does not
    assert (root / "state" / "site-A" / "delivered" / run_id / "model" / "model.safetensors").is_file()
    assert not (root / "state" / "site-B" / "delivered" / run_id).exists()
    opened = [(e["link"], e["site"]) for e in _audit(root / "state" / "server" / "jobs" / job / "audit.log")
              if e["event"] == "fedavg-train" and e["decision"] == "accepted"]
    assert sorted(opened) == [(r, s) for r in (0, 1) for s in ("A", "B", "C")]
