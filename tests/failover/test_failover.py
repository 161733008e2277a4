"""Failover on a real multi-node local Ray cluster (a head and 3 worker nodes, each its own raylet),
through Serve's real gRPC proxy, with streams running while something breaks.

Every test breaks one thing mid-stream and asserts the invariants: every stream completes; its
tokens are the failure-free ones (greedy: transformers' greedy loop; seeded sampling: the same
request run again once the cluster has converged), each delivered once, offsets contiguous;
streams of the broken replica end on another ring member. Each test ends by waiting until the
cluster has converged back (every ring position served, the standby rebuilt), so the next test
starts whole.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from collections import Counter

import grpc
import pytest
import ray

from cluster import chaos
from coordinator.client import Client
from failover.heartbeat import HeartbeatSettings
from protos.ringpipe.v1 import admin_pb2, inference_pb2_grpc
from protos.ringpipe.v1 import inference_pb2 as pb
from tests.conftest import REPLICAS, STANDBY
from tests.reference import hf_greedy, wait_for

pytestmark = pytest.mark.slow

PROMPTS = [(5, 17, 99, 3), (8, 8, 1, 40, 41), (300, 12), (77, 78, 79, 80, 81, 82), (9, 250), (60, 61, 62)]
NEW_TOKENS = 160  # long enough to be mid-stream when the fault comes (at most 80 in); every token costs CPU
SEED = 1234


class Streams:
    """Streams running in threads; each keeps every piece it received."""

    def __init__(self, target: str, requests: list[dict]) -> None:
        self.requests = requests
        self.pieces: list[list] = [[] for _ in requests]
        self.errors: list[BaseException | None] = [None] * len(requests)
        self.threads = [threading.Thread(target=self._run, args=(i, target), daemon=True) for i in range(len(requests))]
        for t in self.threads:
            t.start()

    def _run(self, i: int, target: str) -> None:
        r = self.requests[i]
        try:
            # patient: a node can take every replica with it for the seconds a rebuild takes
            with Client(target, retries=40, max_backoff_s=2.0) as client:
                for piece in client.stream(r["prompt"], NEW_TOKENS, ignore_eos=True, timeout_s=240, **r["options"]):
                    self.pieces[i].append(piece)
        except BaseException as exc:  # noqa: BLE001 — asserted by the test
            self.errors[i] = exc

    def tokens(self, i: int) -> list[int]:
        return [t for p in self.pieces[i] for t in p.token_ids]

    def wait_running(self, n: int = 6) -> None:
        """Until at least half the streams are under way: `n` tokens in, far from done."""

        def running() -> bool:
            under_way = sum(n <= len(self.tokens(i)) < NEW_TOKENS // 2 for i in range(len(self.requests)))
            return under_way >= len(self.requests) // 2

        wait_for(running, 60, "streams to be under way")

    def join(self) -> None:
        for t in self.threads:
            t.join(300)
        assert not any(t.is_alive() for t in self.threads), "a stream did not finish"
        assert self.errors == [None] * len(self.requests), self.errors

    def busiest(self) -> str:
        """The ring position serving most streams now."""
        return Counter(p[-1].replica_id for p in self.pieces if p).most_common(1)[0][0]

    def on(self, member: tuple[str, int]) -> list[int]:
        """Streams still running on `member` now."""
        return [
            i for i, p in enumerate(self.pieces)
            if p and p[-1].finish_reason is None and (p[-1].replica_id, p[-1].epoch) == member
        ]

    def moved(self, streams: list[int], member: tuple[str, int]) -> list[int]:
        """Those of `streams` that ended on another member than `member`."""
        return [i for i in streams if self.members(i)[-1] != member]

    def members(self, i: int) -> list[tuple[str, int]]:
        """The (replica, epoch) members stream i was served by, in order, without repeats."""
        out: list[tuple[str, int]] = []
        for p in self.pieces[i]:
            if p.replica_id and (not out or out[-1] != (p.replica_id, p.epoch)):
                out.append((p.replica_id, p.epoch))
        return out


def requests() -> list[dict]:
    """Greedy prompts, and two seeded-sampling ones."""
    out = [{"prompt": list(p), "options": {}} for p in PROMPTS]
    out.append({"prompt": [11, 12, 13], "options": {"temperature": 0.9, "top_p": 0.95, "seed": SEED}})
    out.append({"prompt": [200, 3], "options": {"temperature": 1.3, "top_k": 50, "seed": SEED + 1}})
    return out


@pytest.fixture(scope="module")
def controller(service):
    from failover.controller import CONTROLLER_NAME, NAMESPACE

    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)


@pytest.fixture(scope="module")
def client(service):
    with Client(service.target) as c:
        yield c


@pytest.fixture(scope="module")
def expected(service, service_checkpoint, client):
    """Failure-free outputs: transformers for greedy requests, the undisturbed service for sampled ones."""
    out = []
    for r in requests():
        if r["options"]:
            out.append(client.generate(r["prompt"], NEW_TOKENS, ignore_eos=True, **r["options"]).token_ids)
        else:
            out.append(hf_greedy(service_checkpoint, tuple(r["prompt"]), NEW_TOKENS))
    return out


def converged(controller) -> bool:
    try:
        membership = ray.get(controller.membership.remote())
        standbys = ray.get(controller.standbys.remote())
    except ray.exceptions.RayActorError:  # the controller is restarting
        return False
    return len(membership.ring_ids) == REPLICAS and len(standbys) == STANDBY


def wait_converged(controller, client) -> None:
    wait_for(lambda: converged(controller), 180, "the cluster to converge back (ring full, standby rebuilt)")

    def serving() -> bool:  # as the coordinators say (a head busy resuming streams may answer late)
        return [r.state for r in client.status().replicas] == [admin_pb2.REPLICA_STATE_SERVING] * REPLICAS

    wait_for(serving, 30, "the status to show every ring member serving")


def check_streams(streams: Streams, expected: list[list[int]]) -> None:
    streams.join()
    for i in range(len(expected)):
        offsets = [p.offset for p in streams.pieces[i]]
        lengths = [len(p.token_ids) for p in streams.pieces[i]]
        assert offsets == [sum(lengths[:k]) for k in range(len(lengths))], f"stream {i}: offsets not contiguous"
        assert streams.tokens(i) == expected[i], f"stream {i} differs from the failure-free run"
        assert streams.pieces[i][-1].finish_reason == "length"


def new_failovers(controller, since: float) -> list[dict]:
    """Failovers recorded at or after wall-clock time `since` (the controller keeps only the recent ones)."""
    return [f for f in ray.get(controller.failovers.remote()) if f["at"] >= since]


def under_load(service, controller, client, stage: int) -> tuple[Streams, chaos.StageProcess, float]:
    """From a converged cluster: streams under way, and stage `stage` of the replica serving most of
    them (the victim); also the wall-clock time before they started."""
    wait_converged(controller, client)
    before = time.time()
    streams = Streams(service.target, requests())
    streams.wait_running()
    return streams, chaos.stage_process(controller, streams.busiest(), stage), before


@pytest.mark.parametrize("stage", [0, 1], ids=["head", "last-stage"])
def test_killed_stage_actor_mid_stream(service, controller, client, expected, stage):
    """A stage actor killed under streams: the standby takes its position, the streams complete
    exactly, and the failover shows in the controller, the status call, Prometheus and `ringpipe status`."""
    streams, victim, before = under_load(service, controller, client, stage)
    epoch = ray.get(controller.membership.remote()).epoch
    old = (victim.replica_id, victim.epoch)
    hit = streams.on(old)
    chaos.kill_stage(victim)
    check_streams(streams, expected)
    # they went on elsewhere: another position, or the standby promoted into this one
    assert streams.moved(hit, old), "no stream was running on the killed replica"
    (failover,) = [f for f in new_failovers(controller, before) if f["pipeline"] == victim.pipeline]
    assert failover["replica_id"] == victim.replica_id and failover["stage"] == stage
    assert "died" in failover["reason"] or "stage failed" in failover["reason"]
    assert failover["action"] == "standby promoted"
    membership = ray.get(controller.membership.remote())
    assert membership.epoch > epoch and victim.pipeline not in {m.pipeline for m in membership.members}
    status = client.status()
    assert any(f.replica_id == victim.replica_id and f.action == "standby promoted" for f in status.failovers)
    check_metrics_show_the_failover(expected)
    check_ringpipe_status_shows(service, victim, failover)
    wait_converged(controller, client)
    check_status_says_who_shares_a_node(controller, client)  # the rebuilt pipeline placed where it could


class RawStreams:
    """Streams on a plain gRPC stub, as grpcurl or a Go client would open them: no retry, no resume."""

    def __init__(self, target: str, requests: list[dict]) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.messages: list[list] = [[] for _ in requests]
        self.errors: list[BaseException | None] = [None] * len(requests)
        self.threads = [threading.Thread(target=self._run, args=(i, r), daemon=True) for i, r in enumerate(requests)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, r: dict) -> None:
        req = pb.GenerateRequest(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        req.token_ids.ids.extend(r["prompt"])
        for name, value in r["options"].items():
            setattr(req.sampling, name, value)
        try:
            for msg in self.stub.GenerateStream(req, timeout=240):
                self.messages[i].append(msg)
        except BaseException as exc:  # noqa: BLE001 — asserted by the test
            self.errors[i] = exc

    def tokens(self, i: int) -> list[int]:
        return [t for m in self.messages[i] for t in m.token_ids]

    def running(self, n: int = 6) -> bool:
        return sum(n <= len(self.tokens(i)) < NEW_TOKENS // 2 for i in range(len(self.messages))) >= len(self.messages) // 2

    def join(self) -> None:
        for t in self.threads:
            t.join(300)
        self.channel.close()
        assert not any(t.is_alive() for t in self.threads), "a stream did not finish"
        assert self.errors == [None] * len(self.messages), [str(e) for e in self.errors]


def node_sets(controller) -> dict[str, set[str]]:
    """Each live pipeline's nodes, from its stage actors' own answers."""
    return {p: {n["node_id"] for n in ns} for p, ns in ray.get(controller.pipeline_nodes.remote()).items()}


def check_status_says_who_shares_a_node(controller, client) -> None:
    """`ringpipe status` names, for each ring member, the members it shares a node with, as the
    stage actors' own nodes say (three pipelines of two stages on three worker nodes cannot all be
    kept apart; `tests/shards/test_placement.py` has the cases where they can)."""
    nodes = node_sets(controller)
    members = {m.replica_id: nodes[m.pipeline] for m in ray.get(controller.membership.remote()).members}
    want = {r: sorted(o for o in members if o != r and members[o] & mine) for r, mine in members.items()}
    assert {r.replica_id: sorted(r.shares_nodes_with) for r in client.status().replicas} == want


def test_raw_streams_wait_out_the_loss_of_every_pipeline(service, controller, client, expected):
    """Every pipeline (both ring members and the standby) loses its head at once under streams on
    plain stubs, greedy and seeded. Nothing can take them until a pipeline is rebuilt: each stream
    pauses, then completes with exactly the failure-free tokens, offsets contiguous."""
    from failover.controller import NAMESPACE

    wait_converged(controller, client)
    streams = RawStreams(service.target, requests())
    wait_for(streams.running, 60, "streams to be under way")
    pipelines = ray.get(controller.pipeline_nodes.remote())
    assert len(pipelines) == REPLICAS + STANDBY
    heads = [ray.get_actor(f"{pipeline}.stage-0.tp0", namespace=NAMESPACE) for pipeline in pipelines]
    for head in heads:  # a crash of each, back to back
        ray.kill(head, no_restart=True)
    streams.join()
    for i, want in enumerate(expected):
        msgs = streams.messages[i]
        lengths = [len(m.token_ids) for m in msgs]
        assert [m.offset for m in msgs] == [sum(lengths[:k]) for k in range(len(msgs))], f"stream {i}: offsets"
        assert streams.tokens(i) == want, f"stream {i} differs from the failure-free run"
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert not set(pipelines) & set(ray.get(controller.pipeline_nodes.remote()))  # every one was lost
    wait_converged(controller, client)


def test_killed_head_mid_sse_stream_completes_identically(service, controller, client, expected):
    """OpenAI streams (server-sent events, the official client) on a replica whose head is killed:
    each completes with exactly the failure-free text, no piece repeated or lost."""
    import openai

    wait_converged(controller, client)
    model = service.cfg.model.served_name
    # long streams: prompts whose 160 greedy tokens hold no EOS (the OpenAI API has no ignore_eos)
    chosen = [i for i in range(len(PROMPTS)) if 2 not in expected[i]][:4]
    assert len(chosen) >= 2, "too few prompts run 160 tokens without EOS"
    # the failure-free text of each: the gRPC answer (asked for all at once), its tokens transformers'
    with concurrent.futures.ThreadPoolExecutor(len(chosen)) as pool:
        answers = list(pool.map(lambda i: client.generate(list(PROMPTS[i]), NEW_TOKENS), chosen))
    assert [list(a.token_ids) for a in answers] == [expected[i] for i in chosen]
    texts = [a.text for a in answers]
    pieces: list[list[str]] = [[] for _ in chosen]
    errors: list[BaseException | None] = [None] * len(chosen)

    def stream(k: int) -> None:
        api = openai.OpenAI(base_url=service.openai_base_url, api_key="unused", max_retries=0, timeout=240)
        try:
            for chunk in api.completions.create(model=model, prompt=list(PROMPTS[chosen[k]]), max_tokens=NEW_TOKENS,
                                                temperature=0, stream=True):
                pieces[k].append(chunk.choices[0].text)
        except BaseException as exc:  # noqa: BLE001 — asserted below
            errors[k] = exc

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(len(chosen))]
    for t in threads:
        t.start()
    wait_for(lambda: all(len("".join(p)) > 20 for p in pieces), 60, "the SSE streams to be under way")
    busiest = max(client.status().replicas, key=lambda r: r.in_flight)
    assert busiest.in_flight >= 1
    chaos.kill_stage(chaos.stage_process(controller, busiest.replica_id, 0))
    for t in threads:
        t.join(300)
    assert errors == [None] * len(chosen)
    assert ["".join(p) for p in pieces] == texts
    wait_converged(controller, client)


def test_killed_worker_node_mid_stream(service, local_cluster, controller, client, expected):
    streams, victim, before = under_load(service, controller, client, 1)
    nodes_before = {p: [n["node_id"] for n in ns] for p, ns in ray.get(controller.pipeline_nodes.remote()).items()}
    doomed = {p for p, ns in nodes_before.items() if victim.node_id in ns}
    chaos.kill_node(local_cluster, victim.node_id)
    try:
        check_streams(streams, expected)
        wait_for(
            lambda: doomed <= {f["pipeline"] for f in new_failovers(controller, before)}, 60,
            "every pipeline with a stage on the dead node to be declared dead",
        )
    finally:
        local_cluster.add_node(node_ip_address="127.0.0.1", object_store_memory=256 << 20, num_cpus=6)
    wait_converged(controller, client)
    live_nodes = {n["node_id"] for ns in ray.get(controller.pipeline_nodes.remote()).values() for n in ns}
    assert victim.node_id not in live_nodes


@pytest.mark.parametrize("stage", [0, 1], ids=["head", "last-stage"])
def test_paused_stage_is_declared_dead_and_fenced(service, controller, client, expected, stage):
    """A hung head stops answering its pings; a hung later stage stalls its pipeline, which the
    head's vigil reports. Either way the pipeline is dead only after the timeout (3 s)."""
    streams, victim, before = under_load(service, controller, client, stage)
    old = (victim.replica_id, victim.epoch)
    hit = streams.on(old)
    chaos.pause_stage(victim)
    try:
        wait_for(lambda: new_failovers(controller, before), 30, "the paused stage to be declared dead")
        # the stage to blame is found after the takeover, by pinging the others (paused still)
        wait_for(lambda: new_failovers(controller, before)[0]["stage"] == stage, 10, f"stage {stage} named")
    finally:
        chaos.resume_stage(victim)  # it runs again: anything it still sends must be dropped
    (failover,) = new_failovers(controller, before)
    assert failover["pipeline"] == victim.pipeline, failover
    if stage == 0:
        assert failover["reason"].startswith("no heartbeat"), failover
        assert failover["silent_s"] >= 3.0  # failover.heartbeat.timeout_s
    else:
        waited = re.match(r"pipeline stalled: its head has waited ([0-9.]+)s", failover["reason"])
        assert waited and float(waited[1]) >= 3.0, failover
    check_streams(streams, expected)
    assert hit and streams.moved(hit, old) == hit  # a paused head cannot finish them: all moved
    for i in hit:
        served = streams.members(i)
        assert old not in served[served.index(old) + 1 :], f"stream {i} took tokens from the fenced replica"
    wait_converged(controller, client)


def test_slow_stage_is_paused_from_new_work_not_killed(service, controller, client, expected):
    # the head's process throttled (20 ms run, 500 ms stopped): its steps (the round trip of its
    # micro-batches) and its ping answers take ~0.5 s: > 200 ms and slower than the peer, 5 times in
    # a row, and never silent for the 3 s timeout. Throttled until the checks below are done (a
    # controller whose loop lags on this busy machine skips observations: it may take more than 5 rounds)
    streams, victim, before = under_load(service, controller, client, 0)
    checked = threading.Event()
    throttle = chaos.throttle_stage(victim, run_s=0.02, stop_s=0.5, duration_s=40.0, done=checked)

    def paused() -> bool:
        member = ray.get(controller.membership.remote()).get(victim.replica_id)
        return member is not None and not member.accepting

    def coordinators_know() -> bool:  # status calls are spread over both coordinators
        states = [{r.replica_id: r.state for r in client.status().replicas} for _ in range(4)]
        return all(s[victim.replica_id] == admin_pb2.REPLICA_STATE_PAUSED for s in states)

    try:
        try:
            wait_for(paused, 30, "the slow replica to be paused")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the controller: {ray.get(controller.health.remote())}") from None
        wait_for(coordinators_know, 10, "the coordinators to show the replica paused")
        for k in range(6):  # new work goes elsewhere while it is paused
            done = client.generate([k + 1, k + 2], 2, session_id=f"slow-{k}")
            assert done.replica_id != victim.replica_id
    finally:
        checked.set()
        throttle.join(30)
    check_streams(streams, expected)  # its in-flight work went on
    assert new_failovers(controller, before) == []
    member = ray.get(controller.membership.remote()).get(victim.replica_id)
    assert member.pipeline == victim.pipeline and member.epoch >= victim.epoch  # same pipeline, not replaced
    wait_for(lambda: not paused(), 30, "the pause to end")
    wait_converged(controller, client)


def test_a_stalled_controller_declares_nobody_dead(service, controller, client, expected):
    """The controller's process stopped (SIGSTOP) for 5 s under streaming load, then continued:
    no failover is recorded, every pipeline keeps its position, and no request fails — through
    plain gRPC stubs, which never resend."""
    import grpc

    from protos.ringpipe.v1 import inference_pb2 as pb
    from protos.ringpipe.v1 import inference_pb2_grpc

    wait_converged(controller, client)
    before_members = ray.get(controller.membership.remote()).members
    before = time.time()
    greedy = [(i, list(PROMPTS[i]), expected[i][:32]) for i in range(3)]
    stop = threading.Event()
    done: list[int] = [0, 0, 0]
    failures: list[str] = []

    def load(k: int) -> None:
        i, prompt, want = greedy[k]
        with grpc.insecure_channel(service.target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not stop.is_set():
                req = pb.GenerateRequest(max_new_tokens=len(want), ignore_eos=True)
                req.token_ids.ids.extend(prompt)
                try:
                    got = [t for msg in stub.GenerateStream(req, timeout=60) for t in msg.token_ids]
                except grpc.RpcError as exc:
                    failures.append(f"stream {k}: {exc.code().name}: {exc.details()}")
                    continue
                if got != want:
                    failures.append(f"stream {k}: tokens differ")
                done[k] += 1

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(done) >= 2, 60, "the streaming load to run")
        chaos.pause_controller(5.0)
        resumed = list(done)
        wait_for(lambda: all(d >= r + 3 for d, r in zip(done, resumed, strict=True)), 60,
                 "requests to complete after the controller runs again")
        time.sleep(1.0)  # a heartbeat round after the stall, for any late verdict to show
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert new_failovers(controller, before) == []
    after = ray.get(controller.membership.remote())
    assert [(m.replica_id, m.pipeline, m.epoch) for m in after.members] == [
        (m.replica_id, m.pipeline, m.epoch) for m in before_members
    ]
    assert ray.get(controller.health.remote())["monitor_stalls"] >= 1  # it noticed its own stall


def test_heads_are_pinged_by_datagram_once_they_answer_one(service, controller, client):
    """Steady state: the heads answer ping datagrams, and Ray calls are only the fallback (before a
    head's first datagram answer, a datagram unanswered for an interval, a node's CPU sample)."""
    wait_converged(controller, client)
    seconds, heads = 4.0, REPLICAS + STANDBY
    before = ray.get(controller.health.remote())["pings"]
    time.sleep(seconds)
    after = ray.get(controller.health.remote())["pings"]
    answered = after["datagram_answers"] - before["datagram_answers"]
    by_ray = after["ray_calls"] - before["ray_calls"]
    interval = HeartbeatSettings().interval_s
    assert answered >= heads * seconds / interval / 2, (before, after)  # each head, most intervals
    # (an answer counted in the window may be to a datagram sent just before it: one per head)
    assert after["datagrams"] - before["datagrams"] >= answered - heads
    assert by_ray < answered / 2, (before, after)


def test_killed_controller_recovers_membership(service, controller, client, expected):
    wait_converged(controller, client)
    membership = ray.get(controller.membership.remote())
    standbys = ray.get(controller.standbys.remote())
    failovers = ray.get(controller.failovers.remote())
    streams = Streams(service.target, requests())
    streams.wait_running()
    chaos.kill_controller(controller)
    check_streams(streams, expected)  # the controller is not on the data path
    after = ray.get(controller.membership.remote())
    assert after.epoch >= membership.epoch  # recovered, not restarted from 0 (weights may have moved it on)
    assert [(m.replica_id, m.epoch, m.pipeline) for m in after.members] == [
        (m.replica_id, m.epoch, m.pipeline) for m in membership.members
    ]
    assert ray.get(controller.standbys.remote()) == standbys
    assert ray.get(controller.failovers.remote()) == failovers
    # the restarted controller still watches: a stage killed now is taken over
    victim = chaos.stage_process(controller, after.members[0].replica_id, 1)
    chaos.kill_stage(victim)
    wait_for(
        lambda: [f for f in ray.get(controller.failovers.remote()) if f["pipeline"] == victim.pipeline],
        30, "the restarted controller to detect a death",
    )
    # and killed again mid-rebuild, it discards the half-built pipeline and the dead one's remains
    chaos.kill_controller(controller)
    wait_converged(controller, client)

    def no_orphans() -> bool:
        live = set(ray.get(controller.pipeline_nodes.remote()))
        named = {a["name"].split(".stage-")[0] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "ringpipe" and a["name"].startswith("ringpipe-controller.p")}
        return named <= live

    wait_for(no_orphans, 60, "every stage actor to belong to a live pipeline")


def test_restarted_controller_discards_what_it_cannot_attach_and_rebuilds_the_standby(service, controller, client):
    """While the controller is stopped, the standby loses a stage actor and a serving pipeline's
    stage hangs (SIGSTOP); then the controller is killed and Ray restarts it. The new incarnation
    cannot attach either: it kills their remaining actors, removes their placement groups, takes
    the hung pipeline's position over and rebuilds, standby included."""
    import os
    import signal

    from ray.util.placement_group import placement_group_table

    wait_converged(controller, client)
    (standby,) = ray.get(controller.standbys.remote())
    member = ray.get(controller.membership.remote()).members[0]
    hung = chaos.stage_process(controller, member.replica_id, 1)
    pid = chaos.controller_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        ray.kill(ray.get_actor(f"{standby}.stage-1.tp0", namespace="ringpipe"), no_restart=True)
        chaos.pause_stage(hung)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        chaos.kill_controller(controller)
        wait_converged(controller, client)
    finally:
        chaos.resume_stage(hung)
    gone = {standby, member.pipeline}
    live = ray.get(controller.pipeline_nodes.remote())
    assert not gone & set(live)
    assert ray.get(controller.membership.remote()).get(member.replica_id).pipeline != member.pipeline
    assert len(ray.get(controller.standbys.remote())) == STANDBY

    def nothing_left() -> bool:
        actors = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "ringpipe"}
        groups = {g["name"]: g["state"] for g in placement_group_table().values()}
        return (not any(a.startswith(tuple(f"{p}.stage-" for p in gone)) for a in actors)
                and all(groups.get(f"{p}.pg", "REMOVED") == "REMOVED" for p in gone))

    wait_for(nothing_left, 60, "the unattachable pipelines' actors and placement groups to be gone")
    failovers = [f for f in ray.get(controller.failovers.remote()) if f["pipeline"] == member.pipeline]
    assert failovers and "restarted" in failovers[-1]["reason"]


def test_killed_coordinator_replica_client_resumes(service, controller, client, expected):
    wait_converged(controller, client)
    streams = Streams(service.target, requests())
    streams.wait_running()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::ringpipe#")]
    assert len(names) == 2, names
    coordinators = [ray.get_actor(n, namespace="serve") for n in names]
    # the one holding most streams now (Serve's replica actor counts its ongoing calls)
    ongoing = ray.get([c.get_num_ongoing_requests.remote() for c in coordinators])
    busiest = coordinators[max(range(2), key=ongoing.__getitem__)]
    assert max(ongoing) > 0, ongoing
    ray.kill(busiest, no_restart=True)
    check_streams(streams, expected)
    resumed = [i for i in range(len(expected)) if any(p.resumes for p in streams.pieces[i])]
    assert resumed, "no stream was on the killed coordinator"

    def idle() -> bool:  # nothing is left running on the heads
        return all(r.in_flight == 0 and r.queue_depth == 0 for r in client.status().replicas)

    wait_for(idle, 60, "the heads to drop the lost coordinator's orphaned requests")
    # Serve replaces the coordinator; the service keeps answering meanwhile
    assert client.generate(PROMPTS[0], 8).token_ids == expected[0][:8]


def scrape_ringpipe_metrics() -> dict[str, float]:
    """Every `ray_ringpipe_*` sample on every node's metrics export port, summed over labels."""
    import urllib.request

    out: dict[str, float] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5).read()
        except OSError:
            continue
        for line in text.decode().splitlines():
            if line.startswith("ray_ringpipe_"):
                name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
                out[name] = out.get(name, 0.0) + value
    return out


def check_metrics_show_the_failover(expected: list[list[int]]) -> None:
    """The takeover shows in Prometheus, through Ray's metrics export."""
    wanted = {
        "ray_ringpipe_failures_detected_total", "ray_ringpipe_takeovers_total", "ray_ringpipe_resumed_requests_total",
        "ray_ringpipe_detection_latency_seconds_count", "ray_ringpipe_time_to_first_token_seconds_count",
        "ray_ringpipe_time_per_output_token_seconds_count", "ray_ringpipe_ring_size", "ray_ringpipe_in_flight",
        "ray_ringpipe_queue_depth", "ray_ringpipe_members",
    }
    seen: dict[str, float] = {}

    def exported() -> bool:
        seen.update(scrape_ringpipe_metrics())
        return wanted <= set(seen) and seen["ray_ringpipe_failures_detected_total"] >= 1 and (
            seen["ray_ringpipe_resumed_requests_total"] >= 1)

    wait_for(exported, 60, f"metrics {sorted(wanted - set(seen))} to be exported, a failure and a resume counted")
    assert seen["ray_ringpipe_time_to_first_token_seconds_count"] >= len(expected)


def check_ringpipe_status_shows(service, victim: chaos.StageProcess, failover: dict) -> None:
    """`ringpipe status` (text and --json) lists the failover as the controller recorded it."""
    import json
    import subprocess
    import sys

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "cluster.cli", "status", "--target", service.target]
    listing = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, env=env, check=True).stdout)
    latest = [f for f in listing["failovers"] if f["replica_id"] == victim.replica_id][-1]
    assert (latest["action"], latest["stage"], latest["reason"]) == (
        failover["action"], failover["stage"], failover["reason"]), (latest, failover)
    assert listing["standbys"] + len(listing["replicas"]) >= REPLICAS
    text = subprocess.run(run, capture_output=True, text=True, env=env, check=True).stdout
    assert "recent failovers" in text and f"{victim.replica_id} stage {failover['stage']}" in text
    assert "standby promoted" in text


@pytest.mark.parametrize(
    ("takeover", "says"),
    [({"max_retries": 0}, "failover.takeover.max_retries"), ({"max_resume_tokens": 4}, "max_resume_tokens")],
    ids=["no-retries-left", "too-long-to-resume"],
)
def test_takeover_limits_end_in_unavailable_saying_why(service, controller, client, takeover, says):
    """Past `max_retries` resumes, or `max_resume_tokens` streamed, a lost generation fails with
    UNAVAILABLE and a message naming the limit; the client library could still resume it."""
    import dataclasses

    import grpc
    from ray import serve

    from cluster.serve import coordinator_settings
    from coordinator.app import build_app
    from protos.ringpipe.v1 import inference_pb2 as pb
    from protos.ringpipe.v1 import inference_pb2_grpc

    wait_converged(controller, client)
    base = coordinator_settings(service.cfg)
    settings = dataclasses.replace(base, takeover=dataclasses.replace(base.takeover, **takeover))
    serve.run(build_app(settings, 1), name="limits", route_prefix="/limits")
    try:
        with grpc.insecure_channel(service.target) as channel:
            req = pb.GenerateRequest(max_new_tokens=NEW_TOKENS, ignore_eos=True)
            req.token_ids.ids.extend(PROMPTS[0])
            call = inference_pb2_grpc.InferenceStub(channel).GenerateStream(
                req, metadata=(("application", "limits"),), timeout=120
            )
            received = 0
            with pytest.raises(grpc.RpcError) as err:
                for msg in call:
                    received += len(msg.token_ids)
                    if received >= 8 and msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                        victim = chaos.stage_process(controller, msg.served_by.replica_id, 1)
                        chaos.kill_stage(victim)
                        received = -(10**9)  # kill once
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert says in err.value.details() and "resume" in err.value.details()
    finally:
        serve.delete("limits")
    wait_converged(controller, client)
