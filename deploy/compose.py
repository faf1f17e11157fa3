"""Compose files from a cluster description: per host, the services `deploy.cluster.services` makes, every
setting in them a `${VARIABLE}` whose value the `.env` beside the files holds. Structure (how many workers,
which role each has) comes from the description; values (addresses, ports, GPUs, image) can change in `.env`."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import yaml
from stagemesh.deploy.cluster import COORDINATOR, GATEWAY, Cluster, Service, load_cluster, services, tls_environment
from stagemesh.errors import InvalidArgument, StagemeshError

MOUNT = "/models"  # where every container sees the host's MODELS_DIR (the image's VOLUME)
CERTS = "/certs"  # where every container sees the description's security.tls_dir (CERTS_DIR)
TOKENS = ("STAGEMESH_CLUSTER_TOKEN", "STAGEMESH_CLIENT_TOKEN")
SPARES = "spares"  # the compose profile of the spare workers
_VARIABLE = re.compile(r"\$\$|\$\{([A-Z][A-Z0-9_]*)\}")

# Flags whose value is the same setting in every service that has them.
SHARED_FLAGS = {
    "--model": "MODEL",
    "--dtype": "DTYPE",
    "--layers": "LAYERS",
    "--expert-placement": "EXPERT_PLACEMENT",
    "--expert-replicas": "EXPERT_REPLICAS",
    "--host": "BIND_ADDRESS",
    "--threads": "THREADS",
    "--kv-memory": "KV_MEMORY",
    "--max-step-tokens": "MAX_STEP_TOKENS",
    "--max-queue": "MAX_QUEUE",
    "--max-running": "MAX_RUNNING",
    "--metrics-port": "GATEWAY_METRICS_PORT",
    "--http-port": "GATEWAY_HTTP_PORT",
}


class _Flow(list):
    """A short list written on one line."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def host_variable(host: str, name: str) -> str:
    return f"HOST_{host.upper().replace('-', '_')}_{name}"


def service_variable(service: Service, name: str) -> str:
    return f"{service.name.upper().replace('-', '_')}_{name}"


def interpolate(text: str, values: dict[str, str]) -> str:
    """What docker-compose makes of `text`: ${NAME} from `values`, $$ as $."""
    return _VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else values[m.group(1)], text)


# ---- variables ----


def compose_values(cluster: Cluster) -> dict[str, str]:
    c = cluster.compose
    return {
        "STAGEMESH_IMAGE": c.image,
        "MODELS_DIR": c.models_dir,
        "RESTART": c.restart,
        "HEALTH_INTERVAL": c.health_interval,
        "HEALTH_TIMEOUT": c.health_timeout,
        "HEALTH_START_PERIOD": c.health_start_period,
    }


def address_values(cluster: Cluster) -> dict[str, str]:
    return {host_variable(h.name, "ADDRESS"): h.address for h in cluster.hosts}


def security_values(cluster: Cluster) -> dict[str, str]:
    """Blank tokens for the operator to fill in .env (a long random string each); the certificates' folder."""
    certs = {"CERTS_DIR": cluster.security.tls_dir} if cluster.security.tls_dir else {}
    return {**certs, **{token: "" for token in TOKENS}}


def security_environment(cluster: Cluster, s: Service) -> dict[str, str]:
    """Every service sends and checks the cluster token; the gateway checks the client token; with TLS each
    presents its own certificate from /certs."""
    env = {TOKENS[0]: f"${{{TOKENS[0]}}}"} | ({TOKENS[1]: f"${{{TOKENS[1]}}}"} if s.role == GATEWAY else {})
    if cluster.security.tls_dir:
        env |= tls_environment(CERTS, s.role if s.role in (COORDINATOR, GATEWAY) else "worker")
    return env


def env_values(cluster: Cluster) -> dict[str, str]:
    """The services' environment: the description's env as is, each host's own env prefixed by the host."""
    return {**cluster.env, **{host_variable(h.name, k): v for h in cluster.hosts for k, v in h.env.items()}}


def flag_templates(cluster: Cluster, service: Service) -> dict[str, str]:
    coordinator_host = host_variable(cluster.host(cluster.coordinator.host).name, "ADDRESS")
    return {
        **{flag: f"${{{name}}}" for flag, name in SHARED_FLAGS.items()},
        "--port": f"${{{service_variable(service, 'PORT')}}}",
        "--dist-port": f"${{{service_variable(service, 'DIST_PORT')}}}",
        "--advertise": f"${{{host_variable(service.host, 'ADDRESS')}}}",
        "--coordinator": f"${{{coordinator_host}}}:${{COORDINATOR_PORT}}",
    }


def template_command(argv: tuple[str, ...], templates: dict[str, str], values: dict[str, str]) -> list[str]:
    """`argv` with each setting's value replaced by its template; single-variable values go into `values`."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in templates and i + 1 < len(argv):
            template, value = templates[token], argv[i + 1]
            single = _VARIABLE.fullmatch(template)
            name = single.group(1) if single else None
            if name and values.setdefault(name, value) != value:
                raise InvalidArgument(f"{token}: services disagree on {name} ({values[name]} and {value})")
            out += [token, template]
            i += 2
        else:
            out.append(token.replace("$", "$$"))
            i += 1
    return out


# ---- files ----


def render(cluster: Cluster, config_name: str = "cluster.yaml") -> dict[str, str]:
    """File name -> text: one compose file per host (compose.yaml for a single host) and the .env."""
    _check_model_path(cluster)
    all_services = services(cluster, pinned=True)
    commands, groups = settings(cluster, all_services)
    files = {}
    for host in cluster.hosts:
        body = {s.name: compose_service(cluster, s, commands[s.name]) for s in all_services if s.host == host.name}
        name = "compose.yaml" if len(cluster.hosts) == 1 else f"compose.{host.name}.yaml"
        files[name] = _header(config_name, host.name) + yaml.dump({"services": body}, Dumper=_Dumper, sort_keys=False)
    files[".env"] = _env_file(groups, config_name)
    return files


def settings(cluster: Cluster, all_services: list[Service]) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Each service's templated command, and the variables' values in titled groups (the .env's sections).
    Checks that every templated command resolves to exactly the service's command."""
    fixed = {**compose_values(cluster), **address_values(cluster)}
    found = dict(fixed)
    commands = {s.name: template_command(s.argv, flag_templates(cluster, s), found) for s in all_services}
    groups = {
        "Image, model volume, restarts, health checks": compose_values(cluster),
        "Where the other hosts reach each host": address_values(cluster),
        "The services' flags": {k: v for k, v in found.items() if k not in fixed},
        "The GPU each worker's container reserves (it sees it as cuda:0)": {
            service_variable(s, "GPU"): str(s.gpu) for s in all_services if s.gpu is not None
        },
        "The services' environment": env_values(cluster),
        "Security: fill in both tokens (e.g. `openssl rand -hex 32`); with TLS, CERTS_DIR holds `stagemesh certs`' "
        "output": security_values(cluster),
    }
    values = _merge(groups)
    for s in all_services:
        if [interpolate(t, values) for t in commands[s.name]] != list(s.argv):
            raise StagemeshError(f"{s.name}: the compose command does not resolve to the service's command")
    return commands, groups


def _merge(groups: dict[str, dict[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for group in groups.values():
        clash = set(values) & set(group)
        if clash:
            raise InvalidArgument(f"env: {sorted(clash)[0]} is a setting of the compose files; rename the variable")
        values.update(group)
    return values


def compose_service(cluster: Cluster, s: Service, command: list[str]) -> dict:
    address = f"${{{host_variable(s.host, 'ADDRESS')}}}:${{{service_variable(s, 'PORT')}}}"
    body = {
        "image": "${STAGEMESH_IMAGE}",
        "command": command,
        "environment": {
            **{k: f"${{{_env_variable(cluster, s, k)}}}" for k, _ in s.env},
            **security_environment(cluster, s),
        },
        "volumes": [
            f"${{MODELS_DIR}}:{MOUNT}:ro",
            *([f"${{CERTS_DIR}}:{CERTS}:ro"] if cluster.security.tls_dir else []),
        ],
        "network_mode": "host",  # NCCL and gloo open ports of their own beyond the rendezvous port
        "restart": "${RESTART}",
        "healthcheck": {
            "test": _Flow(["CMD", "stagemesh", "health", address]),
            "interval": "${HEALTH_INTERVAL}",
            "timeout": "${HEALTH_TIMEOUT}",
            "retries": 3,
            "start_period": "${HEALTH_START_PERIOD}",
        },
    }
    if s.role != COORDINATOR and s.host == cluster.host(cluster.coordinator.host).name:
        body["depends_on"] = {COORDINATOR: {"condition": "service_healthy"}}
    if s.spare:  # started with --profile spares once the mesh serves, or it may take a role first
        body["profiles"] = [SPARES]
    if s.gpu is not None:
        body["ipc"] = "host"  # NCCL's shared-memory transport between the containers of one host
        body["deploy"] = {"resources": {"reservations": {"devices": [_gpu_reservation(s)]}}}
    return body


def _gpu_reservation(s: Service) -> dict:
    ids = _Flow([f"${{{service_variable(s, 'GPU')}}}"])
    return {"driver": "nvidia", "device_ids": ids, "capabilities": _Flow(["gpu"])}


def _env_variable(cluster: Cluster, s: Service, name: str) -> str:
    return host_variable(s.host, name) if name in cluster.host(s.host).env else name


def _check_model_path(cluster: Cluster) -> None:
    path = PurePosixPath(cluster.model.path)
    if not path.is_relative_to(MOUNT) or path == PurePosixPath(MOUNT):
        raise InvalidArgument(
            f"model.path {cluster.model.path!r}: the compose services see checkpoints under "
            f"{MOUNT} (MODELS_DIR is mounted there); write {MOUNT}/NAME"
        )


def _header(config_name: str, host: str) -> str:
    return (
        f"# Host {host!r} of {config_name}, rendered by `stagemesh compose --config {config_name}`.\n"
        "# Edit the description and render again; values (addresses, ports, GPUs, image) live in .env.\n"
    )


def _env_file(groups: dict[str, dict[str, str]], config_name: str) -> str:
    lines = [
        f"# Settings of the compose files in this folder, rendered from {config_name} by `stagemesh compose`.",
        "# Change a value here for this deployment, or edit the description and render again (which rewrites this).",
    ]
    for title, group in groups.items():
        if group:
            lines += ["", f"# {title}", *(f"{k}={v}" for k, v in group.items())]
    return "\n".join(lines) + "\n"


def write_compose(config: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Renders the description into `out_dir` (default: the description's folder); returns the files written."""
    config = Path(config)
    out = Path(out_dir) if out_dir is not None else config.parent
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(load_cluster(config), config.name).items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def stale_files(config: str | Path, out_dir: str | Path | None = None) -> list[str]:
    """The files in `out_dir` that differ from a fresh render, are missing, or are compose files it would not
    write; empty when the folder is up to date."""
    config = Path(config)
    out = Path(out_dir) if out_dir is not None else config.parent
    files = render(load_cluster(config), config.name)
    stale = [name for name, text in files.items() if not (out / name).is_file() or (out / name).read_text() != text]
    return stale + sorted(p.name for p in out.glob("compose*.yaml") if p.name not in files)


def run_compose(config: str, out_dir: str | None, check: bool) -> int:
    """`stagemesh compose`: write the files (exit code 0), or with `check` list the stale ones (1 if any)."""
    if not check:
        for path in write_compose(config, out_dir):
            print(f"wrote {path}")
        return 0
    stale = stale_files(config, out_dir)
    for name in stale:
        print(f"stale: {name} (run `stagemesh compose --config {config}`)")
    return 1 if stale else 0
