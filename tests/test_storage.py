"""The workspace's storage interface on a real SQLite file: named operations and transactions."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from napari_medseg.core.storage import SQLiteStore


def _case(case_id: str, source: str, **extra) -> dict:
    return {"id": case_id, "added": "2026-12-07T00:00:00+00:00", "name": case_id, "source": source,
            "status": "new", **extra}


def test_a_failed_transaction_leaves_nothing(tmp_path):
    store = SQLiteStore(tmp_path / "index.sqlite")
    with store.transaction() as tx:
        assert tx.add_case(**_case("a", "/scans/a.nii.gz"))
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.add_case(**_case("b", "/scans/b.nii.gz"))
            tx.update_case("a", status="predicted", score=0.4, warnings=["too large"], files={"mask": "00"})
            raise RuntimeError("the disk filled up")
    assert [case["id"] for case in store.cases()] == ["a"]
    assert store.cases()[0]["status"] == "new" and store.cases()[0]["files"] == {}


def test_named_operations_round_trip_json_and_keep_the_worklist_order(tmp_path):
    store = SQLiteStore(tmp_path / "index.sqlite")
    with store.transaction() as tx:
        for name in ("a", "b", "c", "d"):
            assert tx.add_case(**_case(name, f"/scans/{name}.nii.gz"))
        assert not tx.add_case(**_case("again", "/scans/a.nii.gz"))  # the same scan is listed once
        tx.update_case("a", status="predicted", score=0.1, volumes=[1.5])
        tx.update_case("b", status="predicted", score=0.9)
        tx.update_case("c", status="predicted", score=0.2, warnings=["brain of 4 L"])
        with pytest.raises(ValueError, match="no column"):
            tx.update_case("a", patient_name="x")
        tx.set_setting("model_name", "brain-t1")
        tx.insert_item(id="i1", created="t", status="queued", split="train", files={"scan": "ab"},
                       label_names={"1": "brain"})
        tx.set_item_status("i1", "used", used_by="v2")
        tx.set_item_status("i1", "queued", used_by="v3")
        tx.record_version(version="v2", model="brain-t1", created="t", status="promoted", metrics={"dice": 0.97},
                          lineage=["i1"])
    # implausible first, then the most doubtful, then those without a score
    assert [case["id"] for case in store.cases("uncertainty")] == ["c", "b", "a", "d"]
    assert [case["id"] for case in store.cases("added", ("new",))] == ["d"]
    assert store.cases_matching("a")[0]["volumes"] == [1.5] and store.case_counts() == {"new": 1, "predicted": 3}
    assert store.setting("model_name") == "brain-t1" and store.setting("missing", 5) == 5
    [item] = store.items()
    assert item["files"] == {"scan": "ab"} and item["label_names"] == {"1": "brain"} and item["used_by"] == "v2"
    assert store.versions()[0]["metrics"] == {"dice": 0.97} and store.versions()[0]["lineage"] == ["i1"]


def _hold_the_write_lock(path, ready, release):
    store = SQLiteStore(path)
    with store.transaction() as tx:
        tx.set_setting("holder", "other process")
        ready.set()
        release.wait(30)


def test_a_transaction_holds_the_write_lock_against_another_process(tmp_path):
    path = tmp_path / "index.sqlite"
    SQLiteStore(path).close()
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_the_write_lock, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        waiting = sqlite3.connect(str(path), timeout=0.2, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            waiting.execute("BEGIN IMMEDIATE")
        waiting.close()
    finally:
        release.set()
        holder.join(60)
    assert SQLiteStore(path).setting("holder") == "other process"


def test_only_the_storage_module_speaks_sql():
    from pathlib import Path

    import napari_medseg

    package = Path(napari_medseg.__file__).parent
    speaking = [str(path.relative_to(package)) for path in package.rglob("*.py")
                if path.name != "storage.py" and any(word in path.read_text(encoding="utf-8") for word in ("sqlite3", ".execute("))]
    assert speaking == [], f"{speaking} write SQL themselves; add a named operation to core/storage.py"
