"""`lambdalake rebuild`: every batch view recomputed from the master dataset alone, after the
views were lost; answers equal the recompute from the raw events."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_flow import Flow, batch_run, first_answer_from, recompute, send_synthetic

from lambdalake.settings import Settings
from lambdalake.stack.up import open_settings_store


@pytest.fixture
def flow(tmp_path: Path):
    flow = Flow(tmp_path)
    yield flow
    flow.stop()


def store_of(flow: Flow):
    env = {k: v for k, v in flow.env.items() if k.startswith("LAMBDALAKE_")}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(flow.env["LAMBDALAKE_HOME"])
        for key, value in env.items():
            patch.setenv(key, value)
        settings = Settings()
        settings.home = settings.home.resolve()
        return open_settings_store(settings)


def test_views_lost_are_rebuilt_from_the_master_dataset(flow: Flow) -> None:
    flow.start()
    pageviews, orders = recompute(send_synthetic(flow, 1_500, seed=51))
    time.sleep(1.5)  # past a slice boundary
    batch_run(flow)
    store = store_of(flow)
    lost = store.list("views/")
    for key in lost:  # the disaster: every batch version, the pointer, the run history
        store.delete(key)
    assert lost and not store.list("views/")

    done = flow.cli("rebuild")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rebuilt ")
    answer = first_answer_from(flow, done.stdout.split()[1])
    assert {r["url"]: r["pageviews"] for r in answer["rows"]} == pageviews
    assert flow.wait_for(dict(orders), "revenue_by_sku_day", "sku", "orders") == orders


def test_rebuild_without_a_master_dataset_is_one_line(tmp_path: Path) -> None:
    flow = Flow(tmp_path)
    done = flow.cli("rebuild")
    assert done.returncode == 1
    assert done.stderr.startswith("error: nothing to rebuild from: no master dataset")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "views")
