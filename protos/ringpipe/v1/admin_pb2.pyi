from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_STARTING: _ClassVar[ReplicaState]
    REPLICA_STATE_SERVING: _ClassVar[ReplicaState]
    REPLICA_STATE_DRAINING: _ClassVar[ReplicaState]
    REPLICA_STATE_DEAD: _ClassVar[ReplicaState]
    REPLICA_STATE_PAUSED: _ClassVar[ReplicaState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_STARTING: ReplicaState
REPLICA_STATE_SERVING: ReplicaState
REPLICA_STATE_DRAINING: ReplicaState
REPLICA_STATE_DEAD: ReplicaState
REPLICA_STATE_PAUSED: ReplicaState

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("epoch", "replicas", "failovers", "standbys", "control_plane", "dtype")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    STANDBYS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    failovers: _containers.RepeatedCompositeFieldContainer[Failover]
    standbys: int
    control_plane: ControlPlane
    dtype: str
    def __init__(self, epoch: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., failovers: _Optional[_Iterable[_Union[Failover, _Mapping]]] = ..., standbys: _Optional[int] = ..., control_plane: _Optional[_Union[ControlPlane, _Mapping]] = ..., dtype: _Optional[str] = ...) -> None: ...

class ControlPlane(_message.Message):
    __slots__ = ("registry_ok", "registry_error", "monitor_stalls")
    REGISTRY_OK_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_ERROR_FIELD_NUMBER: _ClassVar[int]
    MONITOR_STALLS_FIELD_NUMBER: _ClassVar[int]
    registry_ok: bool
    registry_error: str
    monitor_stalls: int
    def __init__(self, registry_ok: _Optional[bool] = ..., registry_error: _Optional[str] = ..., monitor_stalls: _Optional[int] = ...) -> None: ...

class Failover(_message.Message):
    __slots__ = ("at_unix_s", "replica_id", "stage", "reason", "silent_s", "action", "restored_at_unix_s")
    AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SILENT_S_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESTORED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    at_unix_s: float
    replica_id: str
    stage: int
    reason: str
    silent_s: float
    action: str
    restored_at_unix_s: float
    def __init__(self, at_unix_s: _Optional[float] = ..., replica_id: _Optional[str] = ..., stage: _Optional[int] = ..., reason: _Optional[str] = ..., silent_s: _Optional[float] = ..., action: _Optional[str] = ..., restored_at_unix_s: _Optional[float] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "state", "epoch", "stages", "ring_share", "in_flight", "queue_depth", "free_slots", "total_slots", "cached_prefixes", "weight", "weight_reason", "reused_tokens", "shares_nodes_with")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    RING_SHARE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_REASON_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARES_NODES_WITH_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    state: ReplicaState
    epoch: int
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    ring_share: float
    in_flight: int
    queue_depth: int
    free_slots: int
    total_slots: int
    cached_prefixes: int
    weight: float
    weight_reason: str
    reused_tokens: int
    shares_nodes_with: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replica_id: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., epoch: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., ring_share: _Optional[float] = ..., in_flight: _Optional[int] = ..., queue_depth: _Optional[int] = ..., free_slots: _Optional[int] = ..., total_slots: _Optional[int] = ..., cached_prefixes: _Optional[int] = ..., weight: _Optional[float] = ..., weight_reason: _Optional[str] = ..., reused_tokens: _Optional[int] = ..., shares_nodes_with: _Optional[_Iterable[str]] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("index", "node_id", "address", "layer_start", "layer_end")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    index: int
    node_id: str
    address: str
    layer_start: int
    layer_end: int
    def __init__(self, index: _Optional[int] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...
