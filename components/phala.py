"""An app on Phala Cloud, deployed with the ``phala`` CLI through pulumi-command.

What the CLI is called with, the scripts and how its output is read are decided in
``fleet/apps/phala.py``; this component runs them as one ``command.local.Command`` per app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_command as command

from components.stackconfig import secret
from fleet.apps.phala import (API_KEY_ENV, APP_ENV, PRE_LAUNCH_ENV, PhalaError, app_urls, create_script, delete_script,
                              env_file, parse_cvm_info, replacement_triggers, target_problems, update_script)


def _reported(stdout: pulumi.Output[str], name: str) -> pulumi.Output[dict[str, Any]]:
    def parse(text: str) -> dict[str, Any]:
        try:
            return parse_cvm_info(text, where=f"phala cvms get {name} --json")
        except PhalaError as exc:
            raise pulumi.RunError(str(exc)) from None

    return pulumi.Output.unsecret(stdout.apply(parse))


@dataclass
class PhalaDeployment:
    """The deploy step of one app and what Phala reports about its CVM (``appId``, ``composeHash``,
    ``cvmId``, ``status``) plus the gateway ``urls``."""

    command: command.local.Command
    app_id: pulumi.Output[str]
    compose_hash: pulumi.Output[str]
    cvm_id: pulumi.Output[str]
    status: pulumi.Output[str]
    urls: pulumi.Output[list[str]]


def phala_deployment(app, *, config, parent: pulumi.Resource) -> PhalaDeployment:
    """The CVM of one app on Phala Cloud, as a child of ``parent``."""
    target = app.config.phala
    problems = target_problems(app)
    if problems:
        raise pulumi.RunError("; ".join(problems))
    environment: dict[str, Any] = {API_KEY_ENV: secret(config, target.api_key_secret)}
    secret_env = dict(sorted(app.config.secret_env.items()))
    if secret_env:
        names = list(secret_env)

        def build(values: list[str]) -> str:
            try:
                return env_file(dict(zip(names, values)))
            except PhalaError as exc:
                raise pulumi.RunError(f"app {app.name}: {exc}") from None

        environment[APP_ENV] = pulumi.Output.all(*(secret(config, s) for s in secret_env.values())).apply(build)
    if app.pre_launch_script:
        environment[PRE_LAUNCH_ENV] = app.pre_launch_script
    flags = dict(with_env=bool(secret_env), with_pre_launch=bool(app.pre_launch_script))
    step = command.local.Command(
        f"{app.name}-phala-deploy",
        create=create_script(app, target, **flags), update=update_script(app, target, **flags),
        delete=delete_script(app), stdin=app.compose_text, environment=environment,
        interpreter=["/bin/bash", "-c"], triggers=replacement_triggers(app, target),
        opts=pulumi.ResourceOptions(parent=parent, delete_before_replace=True))
    reported = _reported(step.stdout, app.name)
    ports, domain = list(target.ports), target.gateway_domain

    def urls(r: dict[str, Any]) -> list[str]:
        if r["gatewayDomain"] and r["gatewayDomain"] != domain:
            pulumi.log.warn(f"app {app.name}: Phala reports gateway domain {r['gatewayDomain']!r}, the stack "
                            f"configures {domain!r}; the URLs use the configured one")
        return app_urls(r["appId"], ports, domain)

    return PhalaDeployment(command=step, app_id=reported.apply(lambda r: r["appId"]),
                           compose_hash=reported.apply(lambda r: r["composeHash"]),
                           cvm_id=reported.apply(lambda r: r["cvmId"]), status=reported.apply(lambda r: r["status"]),
                           urls=reported.apply(urls))
