"""Artifact Registry: our Docker repository (immutable tags), a Docker Hub mirror and, when a stack
opts in, a public-read repository for the built images of apps Phala Cloud runs."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.adopt import options


class Registry(pulumi.ComponentResource):
    repository: gcp.artifactregistry.Repository
    mirror: gcp.artifactregistry.Repository
    public: gcp.artifactregistry.Repository | None

    def __init__(self, *, repository_id: str, mirror_id: str, project: str, location: str,
                 keep_digests: list[str], keep_recent: int, untagged_days: int, labels: dict[str, str],
                 public_id: str | None = None, opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:bootstrap:Registry", "registry", {}, opts)
        # KEEP wins over DELETE: a digest the lock file names is never cleaned up.
        policies = [
            {"id": "delete-old-untagged", "action": "DELETE",
             "condition": {"tag_state": "UNTAGGED", "older_than": f"{untagged_days * 86400}s"}},
            {"id": "keep-recent", "action": "KEEP", "most_recent_versions": {"keep_count": keep_recent}},
        ]
        if keep_digests:
            policies.append({"id": "keep-locked-digests", "action": "KEEP",
                             "condition": {"version_name_prefixes": sorted(keep_digests)}})
        self.repository = gcp.artifactregistry.Repository(
            "repository", project=project, location=location, repository_id=repository_id, format="DOCKER",
            description="Container images built by the images stack, pulled by digest only",
            docker_config={"immutable_tags": True}, cleanup_policies=policies, cleanup_policy_dry_run=False,
            labels=labels, opts=options("repository", parent=self, protect=True))
        self.mirror = gcp.artifactregistry.Repository(
            "dockerhub-mirror", project=project, location=location, repository_id=mirror_id, format="DOCKER",
            mode="REMOTE_REPOSITORY", description="Docker Hub, pulled through our registry",
            remote_repository_config={"description": "Docker Hub",
                                      "docker_repository": {"public_repository": "DOCKER_HUB"}},
            labels=labels, opts=options("dockerhub-mirror", parent=self))
        # Readable by anyone (the grant is in fleet.project.bootstrap): only images apps opted in to publish.
        self.public = None
        if public_id is not None:
            self.public = gcp.artifactregistry.Repository(
                "public-apps", project=project, location=location, repository_id=public_id, format="DOCKER",
                description="Built images of apps that opted in to be public (Phala Cloud pulls them), by digest",
                docker_config={"immutable_tags": True}, cleanup_policies=policies, cleanup_policy_dry_run=False,
                labels=labels, opts=options("public-apps", parent=self, protect=True))
        self.register_outputs({})
