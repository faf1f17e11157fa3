"""Click building blocks every command line shares: the group that reports errors in one line, the security
options, and `option`, whose default is read from the options dataclass that owns it (typed once, there)."""

from __future__ import annotations

import dataclasses

import click
from stagemesh.errors import StagemeshError


def option(owner: type, field: str, *decls: str, **kwargs):
    """A click option for dataclass `owner`'s `field`: its default is the field's (shown in --help) and its
    parameter name is the field's, so a command can build `owner(**its_parameters)`."""
    default = {f.name: f.default for f in dataclasses.fields(owner)}[field]
    if default is dataclasses.MISSING:
        kwargs.setdefault("required", True)
    else:
        kwargs.setdefault("default", default)
        kwargs.setdefault("show_default", default is not None)
    return click.option(*decls, field, **kwargs)


class StagemeshGroup(click.Group):
    """Reports a StagemeshError as one line on stderr with exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StagemeshError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


def security_options(command):
    """--tls-cert/--tls-key/--tls-ca, --cluster-token, --client-token, --insecure (also STAGEMESH_* variables);
    they configure this process and are inherited by the processes it starts."""
    import functools

    options = [
        click.option("--tls-cert", envvar="STAGEMESH_TLS_CERT", help="This component's certificate (PEM): mutual TLS."),
        click.option("--tls-key", envvar="STAGEMESH_TLS_KEY", help="Its private key (PEM)."),
        click.option("--tls-ca", envvar="STAGEMESH_TLS_CA", help="The cluster CA certificate peers must be signed by."),
        click.option("--cluster-token", envvar="STAGEMESH_CLUSTER_TOKEN", help="Bearer token of internal services."),
        click.option("--client-token", envvar="STAGEMESH_CLIENT_TOKEN", help="Bearer token of the public API."),
        click.option(
            "--insecure",
            is_flag=True,
            envvar="STAGEMESH_INSECURE",
            help="Allow listening beyond loopback with neither TLS nor a token.",
        ),
    ]

    @functools.wraps(command)
    def configured(*args, tls_cert, tls_key, tls_ca, cluster_token, client_token, insecure, **kwargs):
        from stagemesh.proto.security import Security, configure

        configure(Security(tls_cert, tls_key, tls_ca, cluster_token, client_token, insecure))
        return command(*args, **kwargs)

    for option in reversed(options):
        configured = option(configured)
    return configured
