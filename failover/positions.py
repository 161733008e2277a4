"""Ring positions and the pipelines that fill them: the controller's state. Pure: no Ray, no I/O.

Ring positions are slots (`replica-0` …) that survive rebuilds. A slot holds a
pipeline since an epoch, or nothing while its pipeline is rebuilt; warm
standbys wait off the ring. Every change that coordinators must see bumps the
epoch: a pipeline takes or leaves a slot, a member is paused or resumed, its
weight changes. `state()` is what the registry keeps so that a restarted
controller finds the pipelines again (`restore`).

Pipelines are opaque here: anything with `.name` (and `.head`, for members).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from failover.membership import Member, Membership, StageInfo


@dataclass
class Slot:
    pipeline: object | None = None  # None while its pipeline is being rebuilt
    epoch: int = 0  # when the current pipeline took the slot
    stages: tuple[StageInfo, ...] = ()


@dataclass
class Failover:
    at: float  # wall clock
    replica_id: str
    pipeline: str
    stage: int
    reason: str
    silent_s: float
    action: str  # "standby promoted" | "rebuilding" | "standby replaced"
    restored_at: float | None = None
    details: dict = field(default_factory=dict)


class Positions:
    def __init__(self, name: str, recent_failovers: int = 50) -> None:
        self.name = name
        self.slots: dict[str, Slot] = {}
        self.standbys: list[object] = []
        self.pipelines: dict[str, object] = {}  # every live pipeline by name: slots' and standbys'
        self.stages: dict[str, tuple[StageInfo, ...]] = {}  # where each live pipeline's stages run
        self.epoch, self.next_pipeline = 0, 0
        self.unsettled: set[str] = set()  # being built or shut down: discarded after a restart
        self.paused: set[str] = set()  # pipelines off the ring (slow)
        self.weights: dict[str, tuple[float, str]] = {}  # pipeline -> (weight, why)
        self.failovers: collections.deque[Failover] = collections.deque(maxlen=recent_failovers)

    # -- reading
    def slot_of(self, pipeline: str) -> str | None:
        return next((sid for sid, s in self.slots.items() if s.pipeline is not None and s.pipeline.name == pipeline),
                    None)

    def serving(self) -> list[str]:
        """The pipelines holding a slot, paused or not."""
        return [s.pipeline.name for s in self.slots.values() if s.pipeline is not None]

    def empty_slots(self) -> list[str]:
        return sorted(sid for sid, s in self.slots.items() if s.pipeline is None)

    def nodes_in_use(self) -> frozenset[str]:
        return frozenset(stage.node_id for stages in self.stages.values() for stage in stages)

    def membership(self, max_batch: int) -> Membership:
        members = []
        for sid, s in sorted(self.slots.items()):
            if s.pipeline is None:
                continue
            weight, why = self.weights.get(s.pipeline.name, (1.0, ""))
            members.append(Member(
                sid, s.epoch, s.pipeline.head, s.stages, max_batch, accepting=s.pipeline.name not in self.paused,
                pipeline=s.pipeline.name, weight=weight, weight_reason=why,
            ))
        return Membership(self.epoch, tuple(members))

    # -- changes
    def new_name(self) -> str:
        self.next_pipeline += 1
        name = f"{self.name}.p{self.next_pipeline}"
        self.unsettled.add(name)
        return name

    def take_slot(self, slot: str, pipeline, stages: tuple[StageInfo, ...]) -> None:
        self.epoch += 1
        self.slots[slot] = Slot(pipeline, self.epoch, stages)
        self._add(pipeline, stages)

    def add_standby(self, pipeline, stages: tuple[StageInfo, ...]) -> None:
        self.standbys.append(pipeline)
        self._add(pipeline, stages)

    def _add(self, pipeline, stages: tuple[StageInfo, ...]) -> None:
        self.unsettled.discard(pipeline.name)
        self.pipelines[pipeline.name] = pipeline
        self.stages[pipeline.name] = stages

    def drop(self, pipeline) -> None:
        """`pipeline` is no longer live (its slot, if any, is left as it is: see `take_over`)."""
        self.pipelines.pop(pipeline.name, None)
        self.stages.pop(pipeline.name, None)
        self.paused.discard(pipeline.name)
        self.weights.pop(pipeline.name, None)
        if pipeline in self.standbys:
            self.standbys.remove(pipeline)

    def take_over(self, slot: str | None, pipeline: str, stage: int, reason: str, silent_s: float,
                  now: float) -> Failover:
        """Hand a dead pipeline's slot to the first standby (or leave it empty for a rebuild); record it."""
        action = "standby replaced"
        if slot is not None:
            self.epoch += 1
            if self.standbys:
                spare = self.standbys.pop(0)
                self.slots[slot] = Slot(spare, self.epoch, self.stages[spare.name])
                action = "standby promoted"
            else:
                self.slots[slot] = Slot(None, self.epoch)
                action = "rebuilding"
        record = Failover(now, slot or "standby", pipeline, stage, reason, silent_s, action)
        if action == "standby promoted":
            record.restored_at = now
        self.failovers.append(record)
        return record

    def fill(self, pipeline, stages: tuple[StageInfo, ...], now: float) -> str | None:
        """A newly built pipeline takes the first empty slot (returned), else becomes a standby."""
        empty = self.empty_slots()
        if not empty:
            self.add_standby(pipeline, stages)
            return None
        self.take_slot(empty[0], pipeline, stages)
        for f in reversed(self.failovers):
            if f.replica_id == empty[0] and f.restored_at is None:
                f.restored_at = now
                break
        return empty[0]

    def set_paused(self, paused: set[str]) -> bool:
        """Returns whether anything changed (the epoch goes up if so)."""
        if paused == self.paused:
            return False
        self.paused = set(paused)
        self.epoch += 1
        return True

    def set_weights(self, weights: dict[str, tuple[float, str]]) -> bool:
        if weights == self.weights:
            return False
        self.weights = dict(weights)
        self.epoch += 1
        return True

    def clear(self) -> list[object]:
        """Forget every pipeline (a shutdown); returns them."""
        pipelines = list(self.pipelines.values())
        self.pipelines.clear()
        self.stages.clear()
        self.slots.clear()
        self.standbys.clear()
        self.epoch += 1
        return pipelines

    # -- the registry's copy
    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_pipeline": self.next_pipeline,
            "slots": {
                sid: {"pipeline": s.pipeline.name if s.pipeline else None, "epoch": s.epoch,
                      "paused": bool(s.pipeline and s.pipeline.name in self.paused)}
                for sid, s in self.slots.items()
            },
            "standbys": [p.name for p in self.standbys],
            "unsettled": sorted(self.unsettled),
            "failovers": [vars(f) for f in self.failovers],
        }
