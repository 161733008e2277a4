"""The controller's ring positions, without Ray: takeovers, refills, the saved state."""

from __future__ import annotations

from dataclasses import dataclass

from failover.membership import StageInfo
from failover.positions import Positions


@dataclass(frozen=True)
class Pipe:
    name: str
    head: object = None


STAGES = (StageInfo(0, "n1", "127.0.0.1", 0, 2), StageInfo(1, "n2", "127.0.0.1", 2, 4))


def two_slots_and_a_standby() -> tuple[Positions, list[Pipe]]:
    pos = Positions("ctl")
    pipes = [Pipe(pos.new_name()) for _ in range(3)]
    pos.take_slot("replica-0", pipes[0], STAGES)
    pos.take_slot("replica-1", pipes[1], STAGES)
    pos.add_standby(pipes[2], STAGES)
    return pos, pipes


def test_a_death_promotes_the_standby_into_the_same_position_under_a_new_epoch():
    pos, pipes = two_slots_and_a_standby()
    before = pos.membership(4)
    pos.drop(pipes[0])
    record = pos.take_over("replica-0", pipes[0].name, 1, "stage actor died", 0.1, now=1.0)
    after = pos.membership(4)
    assert record.action == "standby promoted" and record.restored_at == 1.0
    assert after.epoch > before.epoch
    assert after.get("replica-0").pipeline == pipes[2].name and after.get("replica-0").epoch == after.epoch
    assert after.get("replica-1") == before.get("replica-1")  # untouched
    assert pos.standbys == [] and pipes[0].name not in pos.pipelines


def test_without_a_standby_the_position_waits_for_the_rebuild_which_takes_it_back():
    pos, pipes = two_slots_and_a_standby()
    pos.drop(pipes[2])
    pos.take_over(None, pipes[2].name, 0, "x", 0.0, now=1.0)  # the standby died
    pos.drop(pipes[1])
    record = pos.take_over("replica-1", pipes[1].name, 0, "y", 0.0, now=2.0)
    assert record.action == "rebuilding" and record.restored_at is None
    assert pos.membership(4).replica_ids == ("replica-0",)
    fresh = Pipe(pos.new_name())
    assert fresh.name in pos.unsettled
    assert pos.fill(fresh, STAGES, now=3.0) == "replica-1"
    assert record.restored_at == 3.0 and fresh.name not in pos.unsettled
    assert pos.fill(Pipe(pos.new_name()), STAGES, now=4.0) is None  # nothing empty: a standby
    assert len(pos.standbys) == 1


def test_pauses_and_weights_change_the_epoch_only_when_they_change():
    pos, pipes = two_slots_and_a_standby()
    epoch = pos.epoch
    assert pos.set_paused({pipes[0].name}) and pos.epoch == epoch + 1
    assert not pos.set_paused({pipes[0].name}) and pos.epoch == epoch + 1
    assert pos.membership(4).ring_ids == ("replica-1",)
    assert pos.set_weights({pipes[1].name: (0.7, "hot")})
    member = pos.membership(4).get("replica-1")
    assert (member.weight, member.weight_reason) == (0.7, "hot")
    assert pos.membership(4).get("replica-0").weight == 1.0


def test_the_saved_state_names_every_pipeline_and_what_was_unsettled():
    pos, pipes = two_slots_and_a_standby()
    half_built = pos.new_name()
    state = pos.state()
    assert state["slots"]["replica-0"]["pipeline"] == pipes[0].name
    assert state["standbys"] == [pipes[2].name]
    assert state["unsettled"] == [half_built]
    assert state["next_pipeline"] == 4 and state["epoch"] == pos.epoch
