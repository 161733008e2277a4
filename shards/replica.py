"""A pipeline replica from the driver's side: every Ray call for a replica is made here.

`Replica.start()` places S stage actors (one placement-group bundle each),
forms their process group, has each stage load only its own tensors, and starts
their loops. `stream()` yields a request's tokens as they are sampled;
`generate()` collects them. A dead stage surfaces as `ReplicaFailed` naming it.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shards.actor import StageActor
from shards.checkpoint import read_model_args
from shards.errors import ReplicaFailed, ShardsError
from shards.partition import StagePlan, plan_stages
from shards.sampling import SamplingParams
from shards.scheduler import GenerationRequest
from shards.spec import ReplicaSpec
from shards.tp import check_divisible

log = logging.getLogger("ringpipe.replica")

_counter = itertools.count()


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def make_request(
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_token_ids: frozenset[int] | set[int] = frozenset(),
    request_id: str | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id or uuid.uuid4().hex,
        tuple(prompt),
        max_new_tokens,
        sampling or SamplingParams(),
        frozenset(stop_token_ids),
    )


class Replica:
    """`detached=True` (with a `namespace`): the placement group and stage actors outlive their
    creator and are named `{name}.pg` / `{name}.stage-{i}.tp{t}`, so a restarted controller can
    `attach` to them by name."""

    def __init__(
        self, spec: ReplicaSpec, name: str | None = None, namespace: str | None = None, detached: bool = False
    ) -> None:
        self.spec = spec
        self.name = name or f"replica-{next(_counter)}-{uuid.uuid4().hex[:6]}"
        self.namespace, self.detached = namespace, detached
        self.args = read_model_args(spec.model_dir)
        self.plans: list[StagePlan] = plan_stages(
            self.args, spec.stages, spec.max_batch, spec.max_seq_len, spec.torch_dtype
        )
        if spec.tensor_parallel > 1:
            check_divisible(self.args, spec.tensor_parallel)
        self.actors: list = []
        self._pg = None

    @property
    def head(self):
        return self.actors[0]

    @property
    def pg_name(self) -> str:
        return f"{self.name}.pg"

    @property
    def actor_names(self) -> list[str]:
        tp = self.spec.tensor_parallel
        return [f"{self.name}.stage-{p.index}.tp{t}" for p in self.plans for t in range(tp)]

    @classmethod
    def discard(cls, spec: ReplicaSpec, name: str, namespace: str) -> None:
        """Kill whatever is left of the detached replica `name`: its actors and placement group."""
        replica = cls(spec, name, namespace, detached=True)
        for actor_name in replica.actor_names:
            try:
                ray.kill(ray.get_actor(actor_name, namespace=namespace), no_restart=True)
            except ValueError:
                pass  # never created, or gone already
        try:
            remove_placement_group(ray.util.get_placement_group(replica.pg_name))
        except ValueError:
            pass

    @classmethod
    def attach(cls, spec: ReplicaSpec, name: str, namespace: str) -> Replica:
        """The running detached replica `name`; raises ValueError if any of its actors is gone."""
        replica = cls(spec, name, namespace, detached=True)
        replica.actors = [ray.get_actor(n, namespace=namespace) for n in replica.actor_names]
        replica._pg = ray.util.get_placement_group(replica.pg_name)
        return replica

    def place(self, timeout_s: float = 300.0, avoid: frozenset[str] = frozenset(),
              hard_wait_s: float = 60.0) -> list[str]:
        """Reserve the stages' resources (the placement group: one bundle per stage, its tensor-parallel
        ranks together); returns the node id of each bundle.

        `avoid`: nodes to keep off (other replicas' nodes, so that one node's failure takes one
        replica, not several), asked of Ray through each bundle's label selector on
        `ray.io/node-id`. Where the live nodes outside `avoid` are big enough for every bundle
        (`fits_off`), the group waits up to `hard_wait_s` for room there (what a retiring replica
        holds comes back within seconds), and stops waiting as soon as that stops being so
        (`_placed_off`: a node found dead). Else, or after that, it is placed anywhere rather than
        not at all, and `ringpipe status` says which replicas share a node."""
        spec = self.spec
        # one bundle per stage, holding its tensor-parallel ranks (one process each): a bundle is on
        # one node, so a stage's all-reduces never cross the network, while the strategy spreads stages
        tp = spec.tensor_parallel
        bundle = {"CPU": spec.cpus_per_stage * tp, **({"GPU": tp} if spec.device == "cuda" else {})}
        bundles = [dict(bundle) for _ in self.plans]
        lifetime = {"lifetime": "detached"} if self.detached else {}
        if avoid:
            distinct = spec.placement_strategy == "STRICT_SPREAD"
            why = "the live nodes outside them are too few or too small for it"
            if fits_off(avoid, bundles, distinct):
                selector = [{"ray.io/node-id": f"!in({','.join(sorted(avoid))})"} for _ in bundles]
                self._pg = placement_group(bundles, strategy=spec.placement_strategy, name=self.pg_name,
                                           bundle_label_selector=selector, **lifetime)
                why = self._placed_off(avoid, bundles, distinct, min(timeout_s, hard_wait_s))
                if why is None:
                    return self._bundle_nodes()
                remove_placement_group(self._pg)
            log.warning("%s: not placed off the other replicas' nodes (%s); placing it anywhere", self.name, why)
        self._pg = placement_group(bundles, strategy=spec.placement_strategy, name=self.pg_name, **lifetime)
        try:
            ray.get(self._pg.ready(), timeout=timeout_s)
        except Exception:
            self.shutdown()
            raise
        return self._bundle_nodes()

    def _placed_off(self, avoid: frozenset[str], bundles: list[dict[str, float]], distinct: bool, wait_s: float,
                    poll_s: float = 0.5) -> str | None:
        """Wait for the placement group kept off `avoid`: None once it is placed, else why not — `wait_s`
        passed, or it no longer fits there: Ray's scheduler calls it infeasible, or `fits_off` says no
        (a node that looked alive when the wait began has since been found dead)."""
        ready, deadline = self._pg.ready(), time.monotonic() + wait_s
        while True:
            done, _ = ray.wait([ready], timeout=max(0.0, min(poll_s, deadline - time.monotonic())))
            if done:
                return None
            if placement_group_table(self._pg)["stats"]["scheduling_state"] == "INFEASIBLE":
                return "Ray's scheduler finds it infeasible there"
            if not fits_off(avoid, bundles, distinct):
                return "a node outside them was found dead; the live ones are too few or too small for it"
            if time.monotonic() >= deadline:
                return f"no room came free outside them within {wait_s:.0f}s"

    def _bundle_nodes(self) -> list[str]:
        table = placement_group_table(self._pg)["bundles_to_node_id"]
        return [table[i] for i in sorted(table)]

    def start(self, timeout_s: float = 300.0) -> list[dict]:
        """Place (unless `place` did), connect, load and start every stage; returns each stage's memory report."""
        spec = self.spec
        tp = spec.tensor_parallel
        ranks = [(plan, t) for plan in self.plans for t in range(tp)]
        lifetime = {"lifetime": "detached"} if self.detached else {}
        if self._pg is None:
            self.place(timeout_s)
        try:
            self.actors = [
                StageActor.options(
                    num_cpus=spec.cpus_per_stage,
                    num_gpus=1 if spec.device == "cuda" else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=plan.index),  # the stage's bundle
                    name=name,
                    namespace=self.namespace,
                    **lifetime,
                ).remote(spec, plan, self.args, self.name, t)
                for (plan, t), name in zip(ranks, self.actor_names, strict=True)
            ]
            host, port = ray.get(self.head.rendezvous.remote(), timeout=timeout_s)
            ray.get([a.connect.remote(host, port) for a in self.actors], timeout=timeout_s)
            memory = ray.get([a.load.remote() for a in self.actors], timeout=timeout_s)
            ray.get([a.start.remote() for a in self.actors], timeout=timeout_s)
        except Exception:
            self.shutdown()
            raise
        return memory

    def stream(self, request: GenerationRequest) -> Iterator[dict]:
        """Yields {"tokens": [...], "finish_reason": ...} items; raises ReplicaFailed if a stage dies."""
        gen = self.head.generate.options(num_returns="streaming").remote(request)
        done = False
        try:
            for ref in gen:
                item = ray.get(ref)
                done = item["finish_reason"] is not None
                yield item
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, ReplicaFailed):
                raise ReplicaFailed(self._diagnose(str(exc.cause))) from None
            if isinstance(exc.cause, ShardsError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise ReplicaFailed(self._diagnose(f"head stage unreachable: {exc}")) from None
        finally:
            if not done:  # closed early (caller gone) or failed: cancel the request on the head
                ray.cancel(gen)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        result = GenerationResult()
        for item in self.stream(request):
            result.token_ids.extend(item["tokens"])
            result.finish_reason = item["finish_reason"] or result.finish_reason
        return result

    def ping(self, timeout_s: float = 2.0) -> list[dict | None]:
        """Each stage's ping answer, or None for a stage that is dead or did not answer in time."""
        return answers([a.ping.remote() for a in self.actors], timeout_s)

    def send_ping(self, index: int):
        """One `ping` call to stage actor `index` (a ref), for a monitor that awaits it."""
        return self.actors[index].ping.remote()

    def send_beat_address(self, index: int):
        """Where stage actor `index` answers ping datagrams (a ref to (host, port); `shards/beat.py`)."""
        return self.actors[index].beat_address.remote()

    def send_pings(self) -> list:
        """One `ping` call per stage actor (refs, in actor order), for a monitor that waits on them."""
        return [a.ping.remote() for a in self.actors]

    def send_vigils(self, stall_after_s: float | None = None) -> list:
        """One `vigil` call per stage actor: each fails when its actor dies, returns when its stage
        fails; the head's also when its pipeline stalled for `stall_after_s` (see `StageActor.vigil`)."""
        return [a.vigil.remote(stall_after_s if i == 0 else None) for i, a in enumerate(self.actors)]

    def stats(self, timeout_s: float = 5.0) -> list[dict | None]:
        """Each stage's stats, or None for a stage that is dead or did not answer in time."""
        return answers([a.stats.remote() for a in self.actors], timeout_s)

    def nodes(self, timeout_s: float | None = None) -> list[dict]:
        """Each stage actor's node id, IP and process id; raises GetTimeoutError past `timeout_s`."""
        return ray.get([a.node.remote() for a in self.actors], timeout=timeout_s)

    def _diagnose(self, detail: str) -> str:
        pings = self.ping()
        dead = sorted({i // self.spec.tensor_parallel for i, p in enumerate(pings) if p is None})
        if dead:
            names = ", ".join(f"stage {i} (layers {self.plans[i].layer_start}-{self.plans[i].layer_end - 1})" for i in dead)
            return f"replica {self.name} lost {names}: {detail}"
        return f"replica {self.name} failed: {detail}"

    def kill_stage(self, index: int, tp_rank: int = 0) -> None:
        """Kill one stage actor (for failure tests and chaos)."""
        ray.kill(self.actors[index * self.spec.tensor_parallel + tp_rank], no_restart=True)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        refs = [a.shutdown.remote() for a in self.actors]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        finally:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self._pg is not None:
                remove_placement_group(self._pg)
                self._pg = None
            self.actors = []


def answers(refs: list, timeout_s: float) -> list:
    """Each call's answer, in order; None for one whose actor is dead or that did not answer within
    `timeout_s` (one deadline for all of them)."""
    deadline = time.monotonic() + timeout_s
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            out.append(None)
    return out


def fits_off(avoid: frozenset[str], bundles: list[dict[str, float]], distinct: bool = False) -> bool:
    """Whether the live nodes outside `avoid` are big enough for every bundle (first fit over each
    node's total resources; `distinct`: one bundle a node at most, as STRICT_SPREAD places them).

    Totals, not what is free this moment: resources a retiring replica still holds come back within
    seconds, and the cluster having room is what decides between keeping replicas apart and not.
    "Live" is as Ray sees it: a node that died is counted until Ray's health checks find it dead."""
    room = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"] and n["NodeID"] not in avoid]
    for b in bundles:
        node = next((res for res in room if all(res.get(k, 0.0) >= v for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
        if distinct:
            room.remove(node)
    return True
