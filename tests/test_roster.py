"""The Roster driven directly (no network, a clock the test moves): a restarted coordinator's restoring
window and rejoins, epochs across a restart, and drain. The processes side is tests/test_failover.py."""

from __future__ import annotations

import pytest
from stagemesh.coordinator.roster import STAGE, HeldRole, NoFreeRole, Roster
from stagemesh.coordinator.server import CoordinatorOptions, build_roster
from stagemesh.errors import FailedPrecondition, NotFound


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_roster(checkpoint):
    """A pp=2 roster of the tiny Llama with a 3 s heartbeat timeout (and restoring window)."""

    def make() -> tuple[Roster, Clock]:
        clock = Clock()
        roster = build_roster(CoordinatorOptions(model_dir=checkpoint("llama"), pp=2))
        return Roster(roster.config, roster.plan, roster.spec, heartbeat_timeout=3.0, clock=clock), clock

    return make


def _ready(stage: int, epoch: int) -> HeldRole:
    return HeldRole("ready", param_bytes=10, kv_blocks=64 - stage, kv_bytes_per_block=8, pipeline_epoch=epoch)


def _wait(roster: Roster, clock: Clock, seconds: float, *beating) -> None:
    """Time passing as the coordinator sees it: a sweep every 0.25 s, a heartbeat from each `beating` worker."""
    for _ in range(round(seconds / 0.25)):
        clock.now += 0.25
        for w in beating:
            roster.heartbeat(w.worker_id, {})
        roster.sweep()


def _serving_mesh(make_roster) -> tuple[Roster, Clock]:
    """A fresh coordinator whose two stages registered (by role, as `stagemesh up` starts them) and are ready."""
    roster, clock = make_roster()
    for s in range(2):
        w = roster.register(STAGE, f"h:{10 + s}", stage=s, tp_rank=0)
        roster.mark_ready(w.worker_id, 10, 64 - s, 8)
    return roster, clock


def test_a_fresh_roster_restores_only_until_every_role_is_held_and_spares_wait_meanwhile(make_roster):
    roster, clock = make_roster()
    assert roster.topology.restoring and not roster.topology.ready
    with pytest.raises(NoFreeRole, match="re-registering workers first"):
        roster.register(STAGE, "h:9")  # role-less: waits as a spare while the window is open
    named = roster.register(STAGE, "h:10", stage=0, tp_rank=0)  # a named role is given at once
    _wait(roster, clock, 3.25, named)
    assert not roster.topology.restoring and not roster.lost  # no rejoin: a fresh start, nothing lost
    assert roster.register(STAGE, "h:9").role == (STAGE, 1, 0)
    assert roster.topology.reason == "waiting for stage 0 rank 0, stage 1 rank 0"  # both loading


def test_rejoining_workers_get_their_roles_back_and_keep_their_pipeline_epoch(make_roster):
    before, _ = _serving_mesh(make_roster)
    epoch = before.topology.pipeline_epoch
    roster, _ = make_roster()  # the restarted coordinator: empty
    with pytest.raises(NoFreeRole):
        roster.register(STAGE, "h:20")  # a spare asking first does not get a role a rejoining worker holds
    roster.rejoin(STAGE, "h:10", "cpu", "", 0, (STAGE, 0, 0), _ready(0, epoch))
    assert roster.topology.restoring and not roster.topology.ready
    roster.rejoin(STAGE, "h:11", "cpu", "", 0, (STAGE, 1, 0), _ready(1, epoch))
    t = roster.topology
    assert t.ready and not t.restoring and t.stage_addresses == ("h:10", "h:11") and t.kv_blocks == 63
    assert t.pipeline_epoch == epoch and t.epoch > epoch  # steps in flight stay valid; epochs only grow
    with pytest.raises(FailedPrecondition, match="held by h:11"):
        roster.rejoin(STAGE, "h:99", "cpu", "", 0, (STAGE, 1, 0), _ready(1, epoch))
    assert [e.kind for e in roster.events].count("rejoined") == 2
    with pytest.raises(NoFreeRole):
        roster.register(STAGE, "h:20")  # every role held: a spare


def test_roles_not_taken_back_in_the_window_are_lost_and_new_pipeline_epochs_start_above_the_reported(make_roster):
    roster, clock = make_roster()
    back = roster.rejoin(STAGE, "h:10", "cpu", "", 0, (STAGE, 0, 0), _ready(0, 41))
    key = roster.add_spare(STAGE, "h:20", "cpu", "")
    _wait(roster, clock, 3.25, back)  # the window closes: stage 1 did not come back
    assert not roster.topology.restoring and roster.topology.recovering
    assert "stage 1 rank 0 is down, a spare is taking over" in roster.topology.reason
    spare = roster.register(STAGE, "h:20")
    roster.remove_spare(key)
    assert spare.role == (STAGE, 1, 0)
    roster.mark_ready(spare.worker_id, 10, 63, 8)
    assert roster.topology.ready and roster.topology.pipeline_epoch > 41
    assert [e.kind for e in roster.events][-3:] == ["dead", "takeover", "ready"]


def test_rejoins_at_different_epochs_make_a_new_pipeline_epoch(make_roster):
    roster, _ = make_roster()
    roster.rejoin(STAGE, "h:10", "cpu", "", 0, (STAGE, 0, 0), _ready(0, 7))
    roster.rejoin(STAGE, "h:11", "cpu", "", 0, (STAGE, 1, 0), _ready(1, 9))
    assert roster.topology.ready and roster.topology.pipeline_epoch > 9


def test_the_coordinators_own_stall_is_not_counted_as_the_workers_silence(make_roster):
    """An overloaded host stops the coordinator for 5 s: heartbeats wait in its queue, and the first sweep
    after the stall must not declare the workers dead; silence that it does see, sweep after sweep, still
    kills at the timeout."""
    roster, clock = _serving_mesh(make_roster)
    w0, w1 = roster.workers.values()
    clock.now += 0.25
    roster.sweep()
    clock.now += 5.0  # no sweep, no heartbeat handled
    roster.sweep()
    assert not roster.lost and roster.topology.ready
    assert roster.events[-1].kind == "stalled" and "did not run for 5.0s" in roster.events[-1].detail
    _wait(roster, clock, 3.25, w0)  # 3.25 s more of sweeps: only stage 0 still sends heartbeats
    assert set(roster.lost) == {w1.role}


def test_drain_needs_a_spare_then_tells_the_worker_to_leave(make_roster):
    roster, clock = _serving_mesh(make_roster)
    assert not roster.topology.restoring  # every role held
    with pytest.raises(FailedPrecondition, match="no stage spare waits to take stage 1 rank 0"):
        roster.drain("stage 1 rank 0")
    with pytest.raises(NotFound, match="no worker 'stage 5 rank 0'"):
        roster.drain("stage 5 rank 0")
    roster.add_spare(STAGE, "h:20", "cpu", "")
    drained = roster.drain("h:11")  # by address
    assert roster.topology.recovering and not roster.topology.ready
    assert roster.heartbeat(drained.worker_id, {})[2].startswith("drained")
    assert roster.events[-1].kind == "drained" and roster.register(STAGE, "h:20").role == (STAGE, 1, 0)


def test_a_tp2_stage_re_forms_its_group_at_a_new_epoch_when_a_rank_is_lost(checkpoint):
    """tp=2: both ranks meet at group epoch 0; rank 1 dies, the stage moves to epoch 1 and is not ready until
    the survivor and the spare that took rank 1 both joined epoch 1 and reported ready in it. A rendezvous
    for an old epoch is refused (it would point a rank at a dead store)."""
    clock = Clock()
    base = build_roster(CoordinatorOptions(model_dir=checkpoint("llama"), tp=2))
    roster = Roster(base.config, base.plan, base.spec, heartbeat_timeout=3.0, clock=clock)
    leader, peer = (roster.register(STAGE, f"h:{10 + r}", stage=0, tp_rank=r) for r in range(2))
    assert roster.join_group(leader.worker_id, -1) == (0, False, "")  # rank 1 has not asked yet
    assert roster.join_group(peer.worker_id, -1)[:2] == (0, True)
    roster.set_rendezvous(leader.worker_id, "h:29500", 0)
    assert roster.join_group(peer.worker_id, -1) == (0, True, "h:29500")
    for w in (leader, peer):
        roster.mark_ready(w.worker_id, 10, 64, 8, group_epoch=0)
    assert roster.topology.ready

    _wait(roster, clock, 3.25, leader)  # rank 1 is silent: lost
    assert roster.groups[0].epoch == 1 and roster.heartbeat(leader.worker_id, {})[1] == 1
    assert not roster.topology.ready and "stage 0 rank 1 is down, no spare" in roster.topology.reason
    assert roster.join_group(leader.worker_id, 0) == (1, False, "")  # the survivor waits for a spare
    roster.add_spare(STAGE, "h:20", "cpu", "")
    spare = roster.register(STAGE, "h:20")
    assert spare.role == (STAGE, 0, 1)
    assert roster.join_group(spare.worker_id, -1) == (1, True, "")
    with pytest.raises(FailedPrecondition, match="group epoch 1, not 0"):
        roster.set_rendezvous(leader.worker_id, "h:29500", 0)
    roster.set_rendezvous(leader.worker_id, "h:29501", 1)
    roster.mark_ready(spare.worker_id, 10, 64, 8, group_epoch=1)
    assert not roster.topology.ready and "re-forming" in roster.topology.reason  # the survivor is still at 0
    roster.mark_ready(leader.worker_id, 10, 64, 8, group_epoch=1)
    assert roster.topology.ready
    assert [e.kind for e in roster.events].count("regroup") == 1
