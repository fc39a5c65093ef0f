"""Where every image an app runs is pulled from, and how the puller authenticates.

**GCE dstack nodes** run the pinned dstack OS (Dstack-TEE/meta-dstack ``v0.6.0.a2``, commit
``86be7d60``, whose ``dstack`` submodule is Dstack-TEE/dstack ``f1ba0a22a961e8bdae110c7b1a796bc56dfd10a8``).
What that guest reads for pulls:

* ``.sys-config.json``'s ``docker_registry`` becomes Docker's ``registry-mirrors`` and nothing else
  (``dstack-util/src/system_setup.rs``, ``setup_docker_registry``). Docker consults a mirror only for
  Docker Hub images, sends it no credentials of its own, and asks it for ``<mirror>/v2/<image>/…``,
  while Artifact Registry serves ``https://<host>/v2/<project>/<repository>/<image>/…``: an
  Artifact Registry remote repository cannot be that mirror, and a public one would be an open
  proxy. So ``docker_registry`` stays unset;
* the measured ``pre_launch_script`` of app-compose, which ``basefiles/app-compose.sh`` sources
  before ``docker compose up``. Ours (``login_script``) logs Docker in to the Artifact Registry host
  with an access token of the node's own service account from the GCE metadata server; the
  bootstrap stack grants that account ``roles/artifactregistry.reader`` on the app registry and on
  the Docker Hub mirror, nothing else. The token lives an hour and the script runs at every boot.
  The guest image has ``curl`` (``dstack-rootfs-base.inc``) and ``jq`` (app-compose.sh uses it).

So in a compose dstack-fleet generates, a Docker Hub image is named through the mirror
(``<region>-docker.pkg.dev/<bootstrap project>/<prefix>-dockerhub/<namespace>/<name>@sha256:…``,
official images under ``library/``; the digest is the same, and Docker checks it), built images
are pulled from the app registry, and any other registry is pulled from directly and anonymously
(it must be public). A compose taken verbatim keeps its references (its bytes are measured as
written); it gets the login only when it names the Artifact Registry host. Both the mirror names
and the login are part of the measured app-compose: choosing them changes the compose-hash.

**Phala Cloud** pulls anonymously: an image of our private registry cannot be pulled there. An
app opts in with ``phala.publicImages``: its built containers are then pushed to the bootstrap's
public-read repository (``dstack-fleet:registry.publicAppImages``), and anyone can pull them.

**dstack VMM hosts** pull as the host's guest image is configured (its own ``docker_registry``);
dstack-fleet does not change them, and their images must be pullable from there.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from fleet.apps.imageref import ImageRef, parse_image_ref

DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
METADATA_TOKEN_URL = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"
NODE_AUTH = "the node's service account (pre-launch docker login with a metadata-server token)"
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Registries:
    """The bootstrap stack's registries, by path (``<host>/<project>/<repository>``)."""

    app: str
    mirror: str | None = None
    public: str | None = None

    @property
    def host(self) -> str:
        return self.app.split("/", 1)[0]


@dataclass(frozen=True)
class Pull:
    where: str  # the compose path of the reference, e.g. services.web.image
    reference: str  # what the guest pulls
    source: str  # where the image comes from: docker-hub-mirror, app-registry, public-app-registry, direct
    auth: str

    def summary(self) -> dict[str, str]:
        return {"image": self.reference, "from": self.source, "auth": self.auth}


def is_docker_hub(ref: ImageRef) -> bool:
    return ref.registry is None or ref.registry in DOCKER_HUB_HOSTS


def _under(ref: ImageRef, path: str | None) -> bool:
    return path is not None and ref.name.startswith(path + "/")


def through_mirror(ref: ImageRef, registries: Registries) -> ImageRef:
    """A Docker Hub image named through the Docker Hub mirror; anything else unchanged."""
    if registries.mirror is None or not is_docker_hub(ref):
        return ref
    host, path = registries.mirror.split("/", 1)
    repository = ref.canonical_name.split("/", 1)[1]  # namespace/name, official images under library/
    return dataclasses.replace(ref, registry=host, repository=f"{path}/{repository}")


def route(where: str, reference: str, target: str, registries: Registries) -> Pull:
    return _route(where, parse_image_ref(reference), reference, target, registries)


def route_pending(where: str, repository: str, target: str, registries: Registries) -> Pull:
    """The pull path of an image still to be built: its repository is known, its digest is not."""
    return _route(where, parse_image_ref(repository), f"{repository}@(pending build)", target, registries)


def _route(where: str, ref: ImageRef, reference: str, target: str, registries: Registries) -> Pull:
    if _under(ref, registries.public):
        return Pull(where, reference, "public-app-registry", ANONYMOUS)
    if target == "gce":
        if _under(ref, registries.mirror):
            return Pull(where, reference, "docker-hub-mirror", NODE_AUTH)
        if _under(ref, registries.app) or ref.registry == registries.host:
            return Pull(where, reference, "app-registry", NODE_AUTH)
    elif _under(ref, registries.app):
        # Phala Cloud and VMM guests cannot authenticate to it (app_problems refuses this for Phala)
        return Pull(where, reference, "app-registry", "none available to this target")
    return Pull(where, reference, "direct", ANONYMOUS)


def needs_login(pulls: list[Pull]) -> bool:
    return any(p.auth == NODE_AUTH for p in pulls)


def login_script(host: str) -> str:
    """Bash for the measured ``pre_launch_script`` (sourced by the guest's app-compose.sh, so it
    defines a function and leaves no variables behind). A failure is reported, not fatal: the pull
    that needs the login then fails with Docker's own message. No surrounding whitespace: vmm-cli
    strips it, so it would measure other bytes (``fleet.apps.compose``)."""
    registry = shlex.quote(f"https://{host}")
    return "\n".join([
        "# dstack-fleet: log Docker in to Artifact Registry as this node's service account (a one-hour token",
        "# from the GCE metadata server; the bootstrap grants the account read access to the registries).",
        "dstack_fleet_registry_login() {",
        "  local token",
        f"  token=$(curl --silent --show-error --fail --retry 5 --header 'Metadata-Flavor: Google' "
        f"{shlex.quote(METADATA_TOKEN_URL)} | jq -r .access_token) || return 1",
        f"  printf '%s' \"$token\" | docker login --username oauth2accesstoken --password-stdin {registry}",
        "}",
        f"dstack_fleet_registry_login || echo 'dstack-fleet: docker login to {host} failed; pulls from it will "
        "fail' >&2",
        "unset -f dstack_fleet_registry_login",
    ])
