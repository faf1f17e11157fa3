"""Mutual TLS and bearer tokens: the mesh serves with them on; clients and workers without the right
certificate or token are refused before reaching a model, and the mesh keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from stagemesh.cli import main
from stagemesh.deploy.certs import make_certs
from support import MeshProcess, child_env

CLUSTER_TOKEN, CLIENT_TOKEN = "cluster-secret", "client-secret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    make_certs(ours, ["worker", "client"], ["localhost", "127.0.0.1"])
    make_certs(theirs, ["worker", "client"], ["localhost", "127.0.0.1"], cluster="other")
    return ours, theirs


def tls(directory, name: str) -> list[str]:
    return [
        "--tls-cert",
        str(directory / f"{name}.crt"),
        "--tls-key",
        str(directory / f"{name}.key"),
        "--tls-ca",
        str(directory / "ca.crt"),
    ]


@pytest.fixture(scope="module")
def secure_mesh(checkpoint, certs):
    ours, _ = certs
    mesh = MeshProcess(
        checkpoint("llama"),
        "--pp",
        "2",
        *tls(ours, "worker"),
        "--cluster-token",
        CLUSTER_TOKEN,
        "--client-token",
        CLIENT_TOKEN,
        "--http-port",
        "0",
    )
    yield mesh
    mesh.stop()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in child_env().items() if not k.startswith("STAGEMESH_")}
    return subprocess.run(
        [sys.executable, "-m", "stagemesh.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def generate(mesh, *security: str) -> subprocess.CompletedProcess:
    return cli(
        "generate",
        "--gateway",
        mesh.gateway,
        "--prompt-ids",
        "5,9,23",
        "--max-tokens",
        "4",
        "--json",
        "--ignore-eos",
        "--timeout",
        "20",
        *security,
    )


def test_generation_works_with_tls_and_tokens(secure_mesh, certs):
    result = generate(secure_mesh, *tls(certs[0], "client"), "--client-token", CLIENT_TOKEN)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 4


def test_the_http_api_takes_the_same_tls_and_token(secure_mesh, certs):
    import ssl

    import httpx
    import openai

    ours, theirs = certs

    def https(directory=None) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(ours / "ca.crt"))
        if directory is not None:
            context.load_cert_chain(str(directory / "client.crt"), str(directory / "client.key"))
        return httpx.Client(verify=context, timeout=30)

    url = f"https://{secure_mesh.http}/v1"
    api = openai.OpenAI(base_url=url, api_key=CLIENT_TOKEN, http_client=https(ours), max_retries=0)
    model = api.models.list().data[0].id
    assert api.completions.create(model=model, prompt=[5, 9, 23], max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", http_client=https(ours), max_retries=0).models.list()
    for refused in (https(None), https(theirs)):  # no client certificate; one our CA did not sign
        with pytest.raises(httpx.TransportError):
            refused.get(f"https://{secure_mesh.http}/health")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{secure_mesh.http}/health", timeout=10)  # plain HTTP on the TLS port


@pytest.mark.parametrize(
    "who,message",
    [
        ("wrong-token", "missing or wrong bearer token"),
        ("no-token", "a bearer token is required"),
        ("no-certificate", "failed to connect"),  # the TLS handshake fails: no certificate to present
        ("other-cluster", "failed to connect"),  # a certificate our CA did not sign
    ],
)
def test_clients_without_the_right_credentials_are_refused(secure_mesh, certs, who, message):
    ours, theirs = certs
    security = {
        "wrong-token": [*tls(ours, "client"), "--client-token", "guess"],
        "no-token": tls(ours, "client"),
        "no-certificate": ["--client-token", CLIENT_TOKEN],
        "other-cluster": [*tls(theirs, "client"), "--client-token", CLIENT_TOKEN],
    }[who]
    refused = generate(secure_mesh, *security)
    assert refused.returncode != 0
    assert message in refused.stderr
    assert generate(secure_mesh, *tls(ours, "client"), "--client-token", CLIENT_TOKEN).returncode == 0


def test_the_client_token_does_not_open_internal_services(secure_mesh, certs):
    ours, _ = certs
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagemesh.coordinator.cli",
            "status",
            "--coordinator",
            secure_mesh.coordinator,
            *tls(ours, "client"),
            "--cluster-token",
            CLIENT_TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert status.returncode == 2 and "missing or wrong bearer token" in status.stderr


def test_a_worker_with_another_clusters_certificate_cannot_join(secure_mesh, certs):
    _, theirs = certs
    intruder = cli(
        "stage-worker",
        "--coordinator",
        secure_mesh.coordinator,
        *tls(theirs, "worker"),
        "--cluster-token",
        CLUSTER_TOKEN,
        "--connect-timeout",
        "3",
    )
    assert intruder.returncode != 0 and "unreachable" in intruder.stderr
    ours, _ = certs
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagemesh.coordinator.cli",
            "status",
            "--coordinator",
            secure_mesh.coordinator,
            "--json",
            *tls(ours, "client"),
            "--cluster-token",
            CLUSTER_TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert status.returncode == 0, status.stderr  # still serving, still two workers
    assert len(json.loads(status.stdout)["workers"]) == 2


def test_nothing_unprotected_listens_beyond_loopback_unless_asked(checkpoint):
    refused = CliRunner().invoke(main, ["coordinator", "--model", checkpoint("llama"), "--host", "0.0.0.0"])
    assert refused.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without TLS or a token" in refused.output
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stagemesh.cli",
            "coordinator",
            "--model",
            checkpoint("llama"),
            "--host",
            "0.0.0.0",
            "--insecure",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout.readline().startswith("ready coordinator address=")
    finally:
        proc.terminate()
        proc.wait(20)
