"""The cluster description: one YAML file (model, tp/pp/ep, hosts and their devices, ports) and the services
it makes — each host's `stagemesh ...` command lines and environment. `stagemesh up --config` runs them here,
`stagemesh compose` renders them as compose files, so the local mesh and a deployment cannot drift apart."""

from __future__ import annotations

import itertools
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import yaml
from stagemesh.deploy.commands import (
    MeshLayout,
    WorkerSite,
    coordinator_command,
    expert_worker_command,
    gateway_command,
    stage_worker_command,
)
from stagemesh.errors import InvalidArgument
from stagemesh.gateway.scheduler import SchedulerLimits
from stagemesh.models.dtypes import SERVING_DTYPES
from stagemesh.models.plan import LayoutOptions

COORDINATOR, GATEWAY, STAGE, EXPERT = "coordinator", "gateway", "stage", "expert"
PLACEMENTS = ("contiguous", "round-robin")
_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]*$")  # it names compose files, services and variables
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(cpu|cuda:[0-9]+)$")


@dataclass(frozen=True)
class ModelSection:
    path: str  # the checkpoint directory as every service sees it (in the compose files: under /models)
    dtype: str = "bfloat16"  # weights and activations on every worker; GPUs serve bf16


@dataclass(frozen=True)
class ParallelSection:
    tp: int = LayoutOptions.tp
    pp: int = LayoutOptions.pp
    ep: int = LayoutOptions.ep  # expert workers (MoE); 0 keeps the experts in the stages
    layers: str | None = None  # inclusive ranges per stage, "0-39,40-79"; default an even split
    expert_placement: str = LayoutOptions.expert_placement
    expert_replicas: str | None = None  # "EXPERT=COPIES,..." or "all=COPIES"


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # where the other hosts reach this one; every service on it advertises this address
    devices: tuple[str, ...] = ("cpu",)  # one worker per entry: "cpu" or "cuda:N" (this host's GPU N)
    env: dict[str, str] = field(default_factory=dict)  # for this host's services only (e.g. its NIC's name)
    spares: tuple[str, ...] = ()  # one spare stage worker per entry (a device, as above): it takes a lost role
    expert_spares: tuple[str, ...] = ()  # the same for expert workers

    @property
    def all_devices(self) -> tuple[str, ...]:
        return self.devices + self.spares + self.expert_spares


@dataclass(frozen=True)
class CoordinatorSection:
    host: str | None = None  # default: the first host
    port: int = 50050


@dataclass(frozen=True)
class GatewaySection:
    host: str | None = None  # default: the first host
    port: int = 50051
    metrics_port: int | None = None  # Prometheus /metrics; None = off
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None = off
    max_step_tokens: int = SchedulerLimits.max_step_tokens
    max_queue: int = SchedulerLimits.max_queue
    max_running: int = SchedulerLimits.max_running
    min_micro_batch: int = SchedulerLimits.min_micro_batch


@dataclass(frozen=True)
class WorkersSection:
    port: int = 50100  # worker i (stage workers by stage then rank, then expert workers) listens on port + i
    dist_port: int = 29500  # stage s's torch.distributed store, on its TP rank 0, listens on dist_port + s
    threads: int | None = None  # torch threads per worker; None = torch's default (every core)
    kv_memory: str | None = None  # KV budget per stage worker; None = 90% of the GPU's free memory
    compile: bool = False  # stage workers decode through compiled graphs (CUDA graphs on GPUs)


@dataclass(frozen=True)
class ComposeSection:
    image: str = "stagemesh:cuda"
    models_dir: str = "./models"  # the host folder mounted read-only at /models
    restart: str = "unless-stopped"
    health_interval: str = "10s"
    health_timeout: str = "5s"
    health_start_period: str = "15m"  # a worker is NOT_SERVING until its shard is loaded: minutes for 70B


@dataclass(frozen=True)
class SecuritySection:
    # `stagemesh certs --out DIR --hosts <every host's address>` output: mutual TLS between all services, each
    # presenting coordinator.crt, gateway.crt or worker.crt. Relative to the description's folder; compose
    # mounts it at /certs. Tokens are not in the description: services read STAGEMESH_CLUSTER_TOKEN and
    # STAGEMESH_CLIENT_TOKEN from their environment (compose: from .env).
    tls_dir: str | None = None


@dataclass(frozen=True)
class Cluster:
    model: ModelSection
    hosts: tuple[Host, ...]
    parallel: ParallelSection = ParallelSection()
    coordinator: CoordinatorSection = CoordinatorSection()
    gateway: GatewaySection = GatewaySection()
    workers: WorkersSection = WorkersSection()
    bind: str = "0.0.0.0"  # the address every service listens on
    env: dict[str, str] = field(default_factory=dict)  # for every service (NCCL_*, GLOO_SOCKET_IFNAME, ...)
    compose: ComposeSection = ComposeSection()
    security: SecuritySection = SecuritySection()

    @property
    def workers_needed(self) -> int:
        return self.parallel.tp * self.parallel.pp + self.parallel.ep

    @property
    def spares(self) -> int:
        return sum(len(h.spares) for h in self.hosts)

    @property
    def expert_spares(self) -> int:
        return sum(len(h.expert_spares) for h in self.hosts)

    def host(self, name: str | None) -> Host:
        """The named host; None = the first."""
        return next(h for h in self.hosts if name is None or h.name == name)

    @property
    def coordinator_address(self) -> str:
        return f"{self.host(self.coordinator.host).address}:{self.coordinator.port}"

    def layout(self) -> MeshLayout:
        p = self.parallel
        return MeshLayout(
            model_dir=self.model.path,
            tp=p.tp,
            pp=p.pp,
            ep=p.ep,
            layers=p.layers,
            expert_placement=p.expert_placement,
            expert_replicas=p.expert_replicas,
            dtype=self.model.dtype,
            threads=self.workers.threads,
            kv_memory=self.workers.kv_memory,
            compile=self.workers.compile,
            host=self.bind,
            port=self.gateway.port,
            coordinator_port=self.coordinator.port,
            max_step_tokens=self.gateway.max_step_tokens,
            max_queue=self.gateway.max_queue,
            max_running=self.gateway.max_running,
            min_micro_batch=self.gateway.min_micro_batch,
            metrics_port=self.gateway.metrics_port,
            http_port=self.gateway.http_port,
            spares=self.spares,
            expert_spares=self.expert_spares,
        )


@dataclass(frozen=True)
class Placement:
    """One worker's role and where it runs."""

    role: str  # STAGE or EXPERT
    index: int  # the stage, or the expert worker's index; a spare's number among the spares of its kind
    rank: int  # TP rank within the stage (0 for expert workers and spares)
    host: Host
    device: str
    port: int
    spare: bool = False  # registers without a role: waits until one is lost, then takes it


@dataclass(frozen=True)
class Service:
    """One process of the mesh: a compose service, or a child of `stagemesh up --config`."""

    name: str  # coordinator, gateway, stage-0-rank-1, expert-2, stage-spare-0, expert-spare-0
    role: str  # COORDINATOR, GATEWAY, STAGE or EXPERT (a spare: the kind of worker it is)
    host: str  # the host's name in the description
    argv: tuple[str, ...]  # the `stagemesh` command line, without the program name
    env: tuple[tuple[str, str], ...]
    port: int  # its gRPC port (health checks dial the host's address and this port)
    gpu: int | None = None  # the GPU a container reserves (services(..., pinned=True)), else None
    spare: bool = False  # a worker without a role: started once the mesh serves


# ---- reading ----


def load_cluster(path: str | Path) -> Cluster:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise InvalidArgument(f"cannot read the cluster description {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path} is not valid YAML: {e}") from None
    return parse_cluster(raw, str(path))


def parse_cluster(raw, where: str = "cluster") -> Cluster:
    """`where` names the source in error messages, before the key path: "cluster.yaml: parallel.tp: ..."."""
    try:
        cluster = _section(Cluster, raw, "")
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from None
    validate(cluster, where)
    return cluster


def _section(cls, raw, where: str):
    """A dataclass from a mapping: unknown keys, missing keys and wrong types are errors naming the key."""
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{_at(where)}expected a mapping, got {_kind(raw)}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise InvalidArgument(f"{_at(where)}unknown key {key!r} (known: {', '.join(known)})")
    for f in known.values():
        if f.name not in raw and f.default is MISSING and f.default_factory is MISSING:
            raise InvalidArgument(f"{_at(where)}{f.name!r} is required")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _typed(value, hints[key], f"{where}.{key}" if where else key) for key, value in raw.items()})


def _typed(value, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        return None if value is None else _typed(value, args[0], where)
    if is_dataclass(hint):
        return _section(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise InvalidArgument(f"{_at(where)}expected a list, got {_kind(value)}")
        return tuple(_typed(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidArgument(f"{_at(where)}expected a mapping, got {_kind(value)}")
        return {str(k): _typed(v, str, f"{where}.{k}") for k, v in value.items()}
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads NCCL_IB_DISABLE: 1 as a number
    raise InvalidArgument(f"{_at(where)}expected {hint.__name__}, got {_kind(value)}")


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


# ---- checking ----


def validate(cluster: Cluster, where: str = "cluster") -> None:
    """Everything that can be checked without the checkpoint (the planner checks the model when it starts)."""
    _check_hosts(cluster, where)
    _check_parallel(cluster, where)
    _check_ports(cluster, where)
    busy = {p.host.name for p in placements(cluster) + spare_placements(cluster)} | {
        cluster.host(cluster.coordinator.host).name,
        cluster.host(cluster.gateway.host).name,
    }
    idle = [h.name for h in cluster.hosts if h.name not in busy]
    if idle:
        raise InvalidArgument(
            f"{where}: host {idle[0]!r} would run no service: the {cluster.workers_needed} "
            "workers fill the hosts' devices in order and are all placed before it"
        )


def _check_hosts(cluster: Cluster, where: str) -> None:
    names = [h.name for h in cluster.hosts]
    if not names:
        raise InvalidArgument(f"{where}: hosts: list at least one host")
    for h in cluster.hosts:
        if not _HOST_NAME.match(h.name):
            raise InvalidArgument(f"{where}: host name {h.name!r}: use lower-case letters, digits and '-'")
        if names.count(h.name) > 1:
            raise InvalidArgument(f"{where}: host {h.name!r} is listed twice")
        bad = [d for d in h.all_devices if not _DEVICE.match(d)]
        if bad:
            raise InvalidArgument(f"{where}: host {h.name!r}: device {bad[0]!r}: write cpu or cuda:N")
        gpus = [d for d in h.all_devices if d != "cpu"]
        if len(set(gpus)) < len(gpus):
            raise InvalidArgument(
                f"{where}: host {h.name!r} lists a GPU twice in devices, spares and expert_spares (one worker per GPU)"
            )
        for name in [*h.env, *cluster.env]:
            if not _ENV_NAME.match(name):
                raise InvalidArgument(f"{where}: {name!r} is not an environment variable name")
    for section in ("coordinator", "gateway"):
        host = getattr(cluster, section).host
        if host is not None and host not in names:
            raise InvalidArgument(f"{where}: {section}.host {host!r} is not one of the hosts ({', '.join(names)})")


def _check_parallel(cluster: Cluster, where: str) -> None:
    p = cluster.parallel
    if p.tp < 1 or p.pp < 1 or p.ep < 0:
        raise InvalidArgument(f"{where}: parallel: tp and pp must be >= 1 and ep >= 0 (got {p.tp}, {p.pp}, {p.ep})")
    if p.expert_placement not in PLACEMENTS:
        raise InvalidArgument(f"{where}: parallel.expert_placement: choose {' or '.join(PLACEMENTS)}")
    if cluster.model.dtype not in SERVING_DTYPES:
        raise InvalidArgument(
            f"{where}: model.dtype {cluster.model.dtype!r}: choose one of {', '.join(SERVING_DTYPES)}"
        )
    if cluster.expert_spares and not p.ep:
        raise InvalidArgument(f"{where}: expert_spares: this mesh has no expert workers (parallel.ep is 0)")
    devices = sum(len(h.devices) for h in cluster.hosts)
    if devices < cluster.workers_needed:
        raise InvalidArgument(
            f"{where}: tp*pp + ep = {p.tp}*{p.pp} + {p.ep} = {cluster.workers_needed} workers need one device "
            f"each, but the hosts list {devices}"
        )


def _check_ports(cluster: Cluster, where: str) -> None:
    """Every port differs, so any two services can share a host (and `up --config` runs them all on one)."""
    w, g = cluster.workers, cluster.gateway
    ranges = {
        "coordinator.port": range(cluster.coordinator.port, cluster.coordinator.port + 1),
        "gateway.port": range(g.port, g.port + 1),
        "workers.port": range(w.port, w.port + cluster.workers_needed + cluster.spares + cluster.expert_spares),
        "workers.dist_port": range(w.dist_port, w.dist_port + cluster.parallel.pp + _spare_dist_ports(cluster)),
    }
    if g.metrics_port is not None:
        ranges["gateway.metrics_port"] = range(g.metrics_port, g.metrics_port + 1)
    if g.http_port is not None:
        ranges["gateway.http_port"] = range(g.http_port, g.http_port + 1)
    for name, ports in ranges.items():
        if ports.start < 1 or ports.stop - 1 > 65535:
            raise InvalidArgument(f"{where}: {name}: ports {ports.start}-{ports.stop - 1} are not all in 1-65535")
    for (a, pa), (b, pb) in itertools.combinations(ranges.items(), 2):
        if set(pa) & set(pb):
            raise InvalidArgument(f"{where}: {a} ({_span(pa)}) and {b} ({_span(pb)}) overlap: give each its own ports")


def _span(ports: range) -> str:
    return str(ports.start) if len(ports) == 1 else f"{ports.start}-{ports.stop - 1}"


def _spare_dist_ports(cluster: Cluster) -> int:
    """With tp > 1 each stage spare has a rendezvous port of its own (for when it takes a rank 0)."""
    return cluster.spares if cluster.parallel.tp > 1 else 0


# ---- services ----


def placements(cluster: Cluster) -> list[Placement]:
    """Workers fill the hosts' devices in order: stage 0's ranks, stage 1's, ..., then the expert workers."""
    p = cluster.parallel
    roles = [(STAGE, s, r) for s in range(p.pp) for r in range(p.tp)] + [(EXPERT, e, 0) for e in range(p.ep)]
    slots = [(host, device) for host in cluster.hosts for device in host.devices]
    return [
        Placement(role, index, rank, host, device, cluster.workers.port + i)
        for i, ((role, index, rank), (host, device)) in enumerate(zip(roles, slots))
    ]


def spare_placements(cluster: Cluster) -> list[Placement]:
    """The hosts' spares in order: every stage spare, then every expert spare; their ports follow the
    workers' (workers.port + tp*pp + ep + i)."""
    stage = [(STAGE, host, device) for host in cluster.hosts for device in host.spares]
    expert = [(EXPERT, host, device) for host in cluster.hosts for device in host.expert_spares]
    first, out = cluster.workers.port + cluster.workers_needed, []
    for i, (role, host, device) in enumerate(stage + expert):
        index = i if role == STAGE else i - len(stage)
        out.append(Placement(role, index, 0, host, device, first + i, spare=True))
    return out


def services(cluster: Cluster, pinned: bool = False) -> list[Service]:
    """Every service in start order: coordinator, gateway, stage workers, expert workers, spares (which are
    started once the mesh serves). `pinned`: each GPU worker runs where it sees only its own GPU (a
    container's device reservation), so it uses cuda:0."""
    layout, coordinator = cluster.layout(), cluster.coordinator_address
    chost, ghost = cluster.host(cluster.coordinator.host), cluster.host(cluster.gateway.host)
    tls = not pinned  # containers see the certificates at /certs: deploy.compose adds that environment itself
    out = [
        Service(
            COORDINATOR,
            COORDINATOR,
            chost.name,
            tuple(coordinator_command(layout)),
            _env(cluster, chost, COORDINATOR if tls else None),
            cluster.coordinator.port,
        ),
        Service(
            GATEWAY,
            GATEWAY,
            ghost.name,
            tuple(gateway_command(layout, coordinator, ghost.address)),
            _env(cluster, ghost, GATEWAY if tls else None),
            cluster.gateway.port,
        ),
    ]
    workers = placements(cluster) + spare_placements(cluster)
    return out + [_worker(cluster, layout, p, pinned) for p in workers]


def host_services(cluster: Cluster, host: str, pinned: bool = False) -> list[Service]:
    return [s for s in services(cluster, pinned) if s.host == host]


def _worker(cluster: Cluster, layout: MeshLayout, p: Placement, pinned: bool) -> Service:
    gpu = int(p.device.split(":")[1]) if pinned and p.device != "cpu" else None
    device = "cuda:0" if gpu is not None else p.device
    coordinator, threads = cluster.coordinator_address, cluster.workers.threads
    tp = cluster.parallel.tp
    if p.role == STAGE:
        store = p.index + (cluster.parallel.pp if p.spare else 0)  # a spare's, for when it takes a rank 0
        dist_port = cluster.workers.dist_port + store if (p.rank == 0 or p.spare) and tp > 1 else None
        site = WorkerSite(device, cluster.bind, p.port, p.host.address, dist_port)
        name = f"stage-spare-{p.index}" if p.spare else f"stage-{p.index}-rank-{p.rank}"
        role = (None, None) if p.spare else (p.index, p.rank)
        argv = stage_worker_command(layout, coordinator, *role, site, threads)
    else:
        site = WorkerSite(device, cluster.bind, p.port, p.host.address)
        name = f"expert-spare-{p.index}" if p.spare else f"expert-{p.index}"
        argv = expert_worker_command(layout, coordinator, None if p.spare else p.index, site, threads)
    env = _env(cluster, p.host, None if pinned else "worker")
    return Service(name, p.role, p.host.name, tuple(argv), env, p.port, gpu, p.spare)


def _env(cluster: Cluster, host: Host, certificate: str | None) -> tuple[tuple[str, str], ...]:
    """The description's and the host's environment, and the TLS files of `certificate` when TLS is on."""
    env = {**cluster.env, **host.env}
    if certificate and cluster.security.tls_dir:
        env.update(tls_environment(cluster.security.tls_dir, certificate))
    return tuple(env.items())


def tls_environment(directory: str, certificate: str) -> dict[str, str]:
    """STAGEMESH_TLS_* for a service presenting <certificate>.crt from `stagemesh certs`' output."""
    return {
        "STAGEMESH_TLS_CERT": f"{directory}/{certificate}.crt",
        "STAGEMESH_TLS_KEY": f"{directory}/{certificate}.key",
        "STAGEMESH_TLS_CA": f"{directory}/ca.crt",
    }


def resolve_paths(cluster: Cluster, base: Path) -> Cluster:
    """The TLS folder relative to the description's folder, as processes started here need it."""
    tls_dir = cluster.security.tls_dir
    if tls_dir is None or Path(tls_dir).is_absolute():
        return cluster
    return replace(cluster, security=SecuritySection(str((base / tls_dir).resolve())))


def localize(cluster: Cluster, address: str = "127.0.0.1") -> Cluster:
    """Every host on this machine: each host's address and the bind address become `address`, and with several
    hosts their GPUs are numbered one after another (host 1's cuda:0-3, then host 2's as cuda:4-7)."""
    gpus = itertools.count()
    hosts = []
    for h in cluster.hosts:
        local = [
            tuple(d if d == "cpu" or len(cluster.hosts) == 1 else f"cuda:{next(gpus)}" for d in ds)
            for ds in (h.devices, h.spares, h.expert_spares)
        ]
        hosts.append(replace(h, address=address, devices=local[0], spares=local[1], expert_spares=local[2]))
    return replace(cluster, hosts=tuple(hosts), bind=address)
