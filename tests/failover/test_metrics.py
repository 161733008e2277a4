"""ringpipe's metrics as declared (`failover/metrics.py`) against what names them elsewhere: the Grafana
dashboard's queries and the README's table; and the replica states the controller records. No Ray
cluster: Ray's metric classes are replaced by recorders. (Exported for real, scraped and parsed:
tests/cluster/test_chaos.py.)"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import failover.metrics as metrics_module
from failover.membership import StageInfo
from failover.positions import Positions

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


class Recorder:
    """Stands for a Ray Counter, Gauge or Histogram: keeps its declaration and what was set."""

    def __init__(self, kind: str, name: str = "", description: str = "", tag_keys=(), boundaries=None) -> None:
        self.kind, self.name, self.tag_keys = kind, name, tuple(tag_keys or ())
        self.values: dict[frozenset, float] = {}

    def set(self, value: float, tags: dict | None = None) -> None:
        assert set(tags or {}) == set(self.tag_keys), (self.name, tags)
        self.values[frozenset((tags or {}).items())] = value

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        key = frozenset((tags or {}).items())
        self.values[key] = self.values.get(key, 0.0) + value

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.inc(1.0, tags)


@pytest.fixture
def declared(monkeypatch) -> metrics_module.Metrics:
    """`metrics()` as the module builds it, with recorders in place of Ray's classes."""
    import ray.util.metrics

    for kind in ("counter", "gauge", "histogram"):
        monkeypatch.setattr(ray.util.metrics, kind.capitalize(), functools.partial(Recorder, kind))
    built = metrics_module.metrics.__wrapped__()
    monkeypatch.setattr(metrics_module, "metrics", lambda: built)
    return built


def exported(m: metrics_module.Metrics) -> dict[str, Recorder]:
    """Every metric by the name Prometheus sees it under (Ray's `ray_` prefix; a counter's `_total`)."""
    out = {}
    for f in dataclasses.fields(m):
        r = getattr(m, f.name)
        out[f"ray_{r.name}" + ("_total" if r.kind == "counter" else "")] = r
    return out


def test_the_dashboard_queries_only_declared_metrics_and_plots_them_all(declared):
    dashboard = json.loads((REPO / "configs" / "grafana-ringpipe.json").read_text())
    assert dashboard["schemaVersion"] >= 30 and dashboard["uid"] and dashboard["panels"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])
    metrics = {f"ray_{r.name}": r for r in exported(declared).values()}
    plotted = set()
    for panel in dashboard["panels"]:
        assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for name in re.findall(r"\bray_ringpipe_\w+", expr):
                base = next((b for b in metrics if name in {b + s for s in SUFFIXES[metrics[b].kind]}), None)
                assert base is not None, f"panel {panel['title']!r} queries {name}, which failover/metrics.py lacks"
                plotted.add(base)
            for inner in re.findall(r"histogram_quantile\([^,]+,\s*(.*)\)", expr):
                assert re.search(r"ray_ringpipe_\w+_bucket", inner) and "le" in inner, expr
    assert plotted == set(metrics), f"not on the dashboard: {sorted(set(metrics) - plotted)}"


def test_the_readme_lists_every_metric_with_its_type_and_labels(declared):
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(ray_ringpipe_\w+)` \| (\w+) \|([^|]*)\|", text, re.MULTILINE)
    listed = {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    assert listed == {name: (r.kind, set(r.tag_keys)) for name, r in exported(declared).items()}


@dataclass(frozen=True)
class Pipe:
    name: str
    head: object = None


STAGES = (StageInfo(0, "n1", "127.0.0.1", 0, 2), StageInfo(1, "n2", "127.0.0.1", 2, 4))


def test_each_position_records_one_state_and_the_standbys_are_counted(declared):
    pos = Positions("ctl")
    a, b, c, d = (Pipe(pos.new_name()) for _ in range(4))
    for slot, pipe in (("replica-0", a), ("replica-1", b), ("replica-2", c)):
        pos.take_slot(slot, pipe, STAGES)
    pos.set_paused({b.name})
    pos.drop(c)
    pos.take_over("replica-2", c.name, 0, "stage actor died", 0.5, now=1.0)  # no standby: rebuilding
    pos.add_standby(d, STAGES)

    metrics_module.record_membership(pos, pos.membership(max_batch=4))

    states = {dict(k)["replica"]: dict(k)["state"] for k, v in declared.replica_state.values.items() if v == 1.0}
    assert states == {"replica-0": "serving", "replica-1": "paused", "replica-2": "rebuilding"}
    assert len(declared.replica_state.values) == 3 * len(metrics_module.REPLICA_STATES)  # the others at 0
    assert declared.ring_size.values == {frozenset(): 1} and declared.members.values == {frozenset(): 2}
    assert declared.standbys.values == {frozenset(): 1}
    assert declared.kv_slots.values == {frozenset({("replica", r)}): 4 for r in ("replica-0", "replica-1")}
