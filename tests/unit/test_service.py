"""The service coordinator's queue: jobs validated in full before they are queued, the kinds' link settings,
the order jobs are taken in, cancelling, the status a person and a script read, and ``weckd compare``."""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from weckd.chain.cli import main
from weckd.chain.errors import ConfigError
from weckd.server.compare import find_results, format_table, run_row
from weckd.server.metrics import ServerMetrics
from weckd.server.scaffold import chain_settings, make_scaffold
from weckd.server.service import Job, Queue, job_federation, new_job_id, read_job_file, submit
from weckd.server.settings import load_federation
from weckd.server.status import format_service_status, service_status

from .fake_grid import federation


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A coordinator's federation.yaml (certs and keys made, nothing started)."""
    return make_scaffold(tmp_path_factory.mktemp("svc"), chain_settings()).federation


def _job_file(tmp_path: Path, body: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def _queue(coordinator: Path) -> Queue:
    return Queue(load_federation(coordinator).settings.state_dir)


def _clear(coordinator: Path) -> None:
    q = _queue(coordinator)
    for folder in (q.queue, q.jobs):
        for path in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
            path.rmdir() if path.is_dir() else path.unlink()


def test_a_job_lays_its_settings_over_the_coordinators(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    job = submit(coordinator, _job_file(tmp_path, {"seed": 7, "link": {"epochs": 2},
                                                   "federation": {"on_site_failure": "skip"}}))
    fed, base = job_federation(load_federation(coordinator), job), load_federation(coordinator)
    assert (fed.chain.seed, fed.chain.link.epochs, fed.settings.on_site_failure) == (7, 2, "skip")
    assert fed.chain.link.lr == base.chain.link.lr and fed.settings.ca == base.settings.ca  # the rest: as configured
    assert [j.id for j in _queue(coordinator).queued()] == [job.id]


@pytest.mark.parametrize(("kind", "expected"), [
    ("chain", {"alpha": 0.9, "init": "predecessor", "do_no_harm": True}),
    ("cwt", {"alpha": 1.0, "init": "predecessor", "do_no_harm": True}),
    ("local", {"alpha": 1.0, "init": "scratch", "do_no_harm": False, "lr_schedule": "link"}),
    ("fedavg", {"alpha": 1.0, "do_no_harm": False}),
])
def test_each_kind_sets_every_link(coordinator: Path, tmp_path: Path, kind: str, expected: dict) -> None:
    _clear(coordinator)
    body = {"link": {"alpha": 0.9}, "links": [{"arch": "test_resnet"} for _ in range(3)]}
    job = submit(coordinator, _job_file(tmp_path, body), kind=kind)
    fed = job_federation(load_federation(coordinator), job)
    for k in range(fed.chain.n_links):
        link = fed.chain.link_settings(k)
        assert {key: getattr(link, key) for key in expected} == expected


@pytest.mark.parametrize(("body", "message"), [
    ({"federation": {"fleet_address": "0.0.0.0:1"}}, "federation.fleet_address: belongs to the coordinator"),
    ({"federation": {"sealing": None}}, "federation.sealing: belongs to the coordinator"),
    ({"chain": {"order": ["A", "X"]}}, "chain.order: site(s) X are not sites of this coordinator"),
    ({"chain": {"order": ["B", "C"]}}, "deliver_to: 'A' is neither a site of chain.order"),  # A gets the model
    ({"link": {"epochs": 0}}, "link.epochs"),
    ({"link": {"arch": "no_such_net"}}, "no_such_net"),
    ({"runtime": {"device": "cpu"}}, "runtime: does nothing in a federated job"),
    ({"link": {"epochs": 2}, "lonk": 1}, "lonk"),
])
def test_a_bad_job_is_one_line_and_nothing_is_queued(coordinator: Path, tmp_path: Path, body: dict,
                                                     message: str) -> None:
    _clear(coordinator)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        submit(coordinator, _job_file(tmp_path, body))
    assert "\n" not in str(err.value) and str(tmp_path / "job.yaml") in str(err.value)
    assert _queue(coordinator).queued() == []


@pytest.mark.parametrize(("kind", "algorithm"), [("chain", "chain"), ("cwt", "chain"), ("local", "chain"),
                                               ("fedavg", "fedavg")])
def test_the_kind_picks_the_algorithm_whatever_the_job_says(coordinator: Path, tmp_path: Path, kind: str,
                                                             algorithm: str) -> None:
    _clear(coordinator)
    job = submit(coordinator, _job_file(tmp_path, {"link": {"epochs": 2}}), kind=kind)
    assert job_federation(load_federation(coordinator), job).settings.algorithm == algorithm
    with pytest.raises(ConfigError, match="federation.algorithm: belongs to the coordinator"):
        submit(coordinator, _job_file(tmp_path, {"federation": {"algorithm": "fedavg"}}), kind=kind)


def test_a_fedavg_job_of_several_architectures_is_refused(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    body = {"links": [{"arch": "test_resnet"}, {"arch": "test_efficientnet"}, {"arch": "test_resnet"}]}
    with pytest.raises(ConfigError, match="fedavg trains one model at every site; the links name test_efficientnet"):
        submit(coordinator, _job_file(tmp_path, body), kind="fedavg")
    assert _queue(coordinator).queued() == []


def test_fedavg_in_a_sealed_federation_needs_the_coordinators_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must list 'coordinator' in federation.sealing.deliver_to"):
        federation(tmp_path, ["A", "B"], algorithm="fedavg", sealing={"deliver_to": ["A"]})


def test_a_job_on_fewer_sites_runs_only_those(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    job = submit(coordinator, _job_file(tmp_path, {"chain": {"order": ["A", "C"]}}))
    fed = job_federation(load_federation(coordinator), job)
    assert list(fed.chain.chain.order) == ["A", "C"] and sorted(fed.sites) == ["A", "C"]


def test_jobs_are_taken_oldest_first_and_an_interrupted_one_before_them(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    ids = [submit(coordinator, _job_file(tmp_path, {}), name=f"j{i}").id for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    q = _queue(coordinator)
    first = q.take()
    assert first is not None and first.id == ids[0] and first.status == "running"
    assert [j.id for j in q.queued()] == ids[1:]
    again = q.take()  # the coordinator stopped while it ran: it is taken again (and resumes its checkpoint)
    assert again is not None and again.id == ids[0]
    first.status = "completed"
    q.save(first)
    nxt = q.take()
    assert nxt is not None and nxt.id == ids[1]


def test_cancel_takes_a_queued_job_out_and_refuses_a_running_one(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    a = submit(coordinator, _job_file(tmp_path, {}), name="a")
    b = submit(coordinator, _job_file(tmp_path, {}), name="b")
    q = _queue(coordinator)
    assert q.take().id == a.id  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=f"job {a.id} is running, not queued"):
        q.cancel(a.id)
    assert q.cancel(b.id).status == "cancelled"
    assert q.queued() == [] and {j.id: j.status for j in q.records()} == {a.id: "running", b.id: "cancelled"}
    with pytest.raises(ConfigError, match="no such job"):
        q.cancel("20990101-000000-000-ffff")


def test_a_record_that_is_not_a_job_is_skipped(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    good = submit(coordinator, _job_file(tmp_path, {})).id
    q = _queue(coordinator)
    (q.queue / "00000000-000000-000-0000.json").write_text("{not json")
    (q.queue / "00000000-000000-000-0001.json").write_text(json.dumps({"id": "x", "kind": "rm -rf", "name": "",
                                                                        "submitted": 0, "source": ""}))
    os.symlink(q.queue / f"{good}.json", q.queue / "00000000-000000-000-0002.json")
    evil = {"id": "../../../tmp/x", "kind": "chain", "name": "", "submitted": 0, "source": ""}  # a path, not an id
    (q.queue / "00000000-000000-000-0003.json").write_text(json.dumps(evil))
    assert [j.id for j in q.queued()] == [good]


def test_job_ids_sort_by_time() -> None:
    t = time.time()
    assert new_job_id(t) < new_job_id(t + 0.002) < new_job_id(t + 1)


def test_submit_and_status_from_the_command_line(coordinator: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _clear(coordinator)
    job = _job_file(tmp_path, {"link": {"epochs": 1}})
    assert main(["submit", str(job), "-c", str(coordinator), "--kind", "cwt", "--json"]) == 0
    queued = json.loads(capsys.readouterr().out)
    assert queued["kind"] == "cwt" and queued["status"] == "queued" and queued["ahead"] == 0
    assert main(["submit", str(job), "-c", str(coordinator)]) == 0
    assert "1 job(s) ahead of it" in capsys.readouterr().out
    assert main(["status", "-c", str(coordinator), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == "service" and not s["coordinator_running"] and len(s["queue"]) == 2
    assert s["queue"][0]["id"] == queued["id"] and s["running"] is None
    assert main(["submit", str(tmp_path / "missing.yaml"), "-c", str(coordinator)]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_status_shows_the_running_job_and_the_finished_ones(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    fed = load_federation(coordinator)
    a, b, c = (submit(coordinator, _job_file(tmp_path, {}), name=n) for n in ("done", "now", "next"))
    q = _queue(coordinator)
    done = q.take()
    assert done is not None
    done.status, done.finished, done.summary = "completed", time.time(), {"delivered_accuracy": 0.8125}
    q.save(done)
    now = q.take()
    assert now is not None
    (q.job_dir(now.id) / "progress-1.jsonl").write_text(
        json.dumps({"t": 1.0, "event": "link-start", "link": 2, "links": 3, "site": "B"}) + "\n")
    stopped = service_status(fed)
    assert stopped["running"]["chain"]["current"] is None and not stopped["coordinator_running"]
    assert "resumes when the coordinator starts again" in format_service_status(stopped)
    with (q.state / "weckd-server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running weckd-server holds it
        s = service_status(fed)
    assert s["coordinator_running"] and s["running"]["id"] == b.id and s["running"]["chain"]["current"]["site"] == "B"
    assert [j["id"] for j in s["queue"]] == [c.id] and [j["id"] for j in s["recent"]] == [a.id]
    text = format_service_status(s)
    assert "running: job" in text and "link 2/3 at site B" in text and "delivered accuracy 0.812" in text


def _results(kind: str, order: list[str], delivered: int, per_link: list[dict[str, float]], seed: int = 0) -> dict:
    links = [{"site": site, "val": {"accuracy": acc[site], "n": 10}, "epochs": [{}, {}], "train_seconds": 1.5,
              "bytes_to_site": 1000, "bytes_from_site": 500,
              "evaluations": {s: {"accuracy": a, "n": 10} for s, a in acc.items()}}
             for site, acc in zip(order, per_link)]
    return {"job": {"id": f"j-{kind}", "kind": kind, "name": kind}, "order": order, "seed": seed, "links": links,
            "delivered": {"link": delivered}, "summary": {"seconds": 9.0}, "run_id": "r"}


def test_compare_scores_the_delivered_model_and_each_sites_own(tmp_path: Path) -> None:
    per_link = [{"A": 0.5, "B": 0.4, "C": 0.3}, {"A": 0.6, "B": 0.7, "C": 0.5}, {"A": 0.9, "B": 0.6, "C": 0.8}]
    chain = run_row(_results("chain", ["A", "B", "C"], 2, per_link), "chain")
    assert chain["sites"] == {"A": 0.6, "B": 0.7, "C": 0.5} and chain["pooled"] == pytest.approx(0.6)
    alone = run_row(_results("local", ["A", "B", "C"], 3, per_link), "local")
    assert alone["sites"] == {"A": 0.5, "B": 0.7, "C": 0.8}  # link k is site k's own model on its own split
    assert (alone["site_epochs"], alone["train_seconds"], alone["bytes"]) == (6, 4.5, 4500)
    table = format_table([chain, alone])
    assert "pooled" in table and "+6.7" in table and "note:" not in table
    other_seed = run_row(_results("chain", ["A", "B", "C"], 2, per_link, seed=3), "x")
    assert "different seeds" in format_table([chain, other_seed])


def test_compare_names_what_it_cannot_find(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="no results.json there"):
        find_results("nope", tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"links": 3}')
    assert main(["compare", str(tmp_path / "bad")]) == 2
    assert "not a weckd federation results file" in capsys.readouterr().err


def test_a_new_job_starts_the_per_chain_gauges_over() -> None:
    m = ServerMetrics(3, ["A", "B", "C"], 60.0)
    m.observe({"event": "link-done", "link": 1, "links": 3, "site": "A", "val_accuracy": 0.7, "seconds": 5.0,
               "evaluations": {"B": 0.6}, "bytes_to_site": 10, "bytes_from_site": 20})
    assert m.registry.get_sample_value("weckd_link_accuracy_ratio", {"link": "1", "site": "B", "split": "val"}) == 0.6
    m.new_chain(2, ["B", "C"], 30.0)
    assert m.registry.get_sample_value("weckd_link_accuracy_ratio", {"link": "1", "site": "B", "split": "val"}) is None
    assert m.registry.get_sample_value("weckd_chain_links") == 2.0
    assert m.registry.get_sample_value("weckd_chain_links_completed") == 0.0
    assert m.registry.get_sample_value("weckd_relay_bytes_total", {"site": "A", "direction": "from_site"}) == 20.0


@pytest.mark.parametrize("kind", ["chain", "cwt", "local", "fedavg"])
def test_the_shipped_job_example_is_a_valid_job(kind: str) -> None:
    repo = Path(__file__).resolve().parents[2]
    fed = load_federation(repo / "configs" / "federation.yaml")
    job = Job(id=new_job_id(), kind=kind, name="alpha", submitted=0.0, source="configs/job-alpha.yaml",
              job=read_job_file(repo / "configs" / "job-alpha.yaml"))
    jfed = job_federation(fed, job)
    assert jfed.settings.evaluate == "all" and jfed.chain.link.alpha == (0.8 if kind == "chain" else 1.0)


def test_a_job_name_is_a_plain_name(coordinator: Path, tmp_path: Path) -> None:
    _clear(coordinator)
    with pytest.raises(ConfigError, match="--name 'a\\\\nfake log line': use 1-64 letters"):
        submit(coordinator, _job_file(tmp_path, {}), name="a\nfake log line")
    assert _queue(coordinator).queued() == []
    assert submit(coordinator, _job_file(tmp_path, {}), name="alpha 0.8 run-2").name == "alpha 0.8 run-2"


@pytest.mark.parametrize("flag", ["--fresh", "--hold"])
def test_the_service_refuses_the_one_shot_flags(coordinator: Path, flag: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from weckd.server.cli import main as server_main

    assert server_main(["-c", str(coordinator), "--service", flag]) == 2
    err = capsys.readouterr().err
    assert f"--service runs submitted jobs, each with its own checkpoint; {flag} applies to the one-shot" in err
