"""fleet.changes: the replace / stop / live table field by field, and the rollout check."""

from __future__ import annotations

import json
import re

import pytest

from fleet.plan import changes
from fleet.plan.changes import LIVE, REPLACE, STOP, action_for
from fleet.plan.planner import build_plan

from .test_images import lock_all

I = "gcp:compute/instance:Instance"

# From the Google provider's instance schema: ForceNew fields, needToStopInstanceBeforeUpdating,
# and the fields updated in place (see the module docstring for the source).
INSTANCE_FIELDS = [
    ("name", REPLACE), ("zone", REPLACE), ("project", REPLACE), ("hostname", REPLACE),
    ("bootDisk.initializeParams.image", REPLACE), ("bootDisk.initializeParams.type", REPLACE),
    ("bootDisk.initializeParams.size", LIVE), ("bootDisk.autoDelete", LIVE), ("bootDisk.deviceName", REPLACE),
    ("bootDisk.kmsKeySelfLink", REPLACE), ("confidentialInstanceConfig.confidentialInstanceType", REPLACE),
    ("metadataStartupScript", REPLACE), ("networkInterfaces[0].networkIp", REPLACE),
    ("networkInterfaces[0].nicType", REPLACE), ("networkInterfaces[0].queueCount", REPLACE),
    ("networkInterfaces[0].accessConfigs[0].natIp", LIVE), ("networkInterfaces[0].subnetwork", STOP),
    ("networkInterfaces[0].network", STOP), ("guestAccelerators", REPLACE), ("scratchDisks", REPLACE),
    ("scheduling.preemptible", REPLACE), ("scheduling.provisioningModel", REPLACE),
    ("scheduling.automaticRestart", LIVE), ("scheduling.onHostMaintenance", LIVE),
    ("scheduling.nodeAffinities", STOP), ("advancedMachineFeatures.enableUefiNetworking", REPLACE),
    ("advancedMachineFeatures.threadsPerCore", STOP), ("reservationAffinity.type", REPLACE),
    ("machineType", STOP), ("minCpuPlatform", STOP), ("serviceAccount.email", STOP),
    ("serviceAccount.scopes[0]", STOP), ("shieldedInstanceConfig.enableVtpm", STOP), ("enableDisplay", STOP),
    ("metadata.serial-port-enable", LIVE), ("tags[0]", LIVE), ("labels.group", LIVE), ("description", LIVE),
    ("deletionProtection", LIVE), ("resourcePolicies", LIVE), ("attachedDisks[1].source", LIVE),
    ("allowStoppingForUpdate", LIVE), ("desiredStatus", LIVE), ("somethingNew", REPLACE),
]


@pytest.mark.parametrize("path,expected", INSTANCE_FIELDS)
def test_instance_fields(path, expected):
    assert action_for(I, path) == expected


@pytest.mark.parametrize("type_,path,expected", [
    ("gcp:compute/disk:Disk", "size", LIVE), ("gcp:compute/disk:Disk", "type", REPLACE),
    ("gcp:compute/disk:Disk", "zone", REPLACE), ("gcp:compute/disk:Disk", "image", REPLACE),
    ("gcp:compute/disk:Disk", "labels.node", LIVE), ("gcp:compute/disk:Disk", "name", REPLACE),
    ("gcp:compute/address:Address", "address", REPLACE), ("gcp:compute/address:Address", "labels.x", LIVE),
    ("gcp:compute/address:Address", "subnetwork", REPLACE),
    ("gcp:compute/image:Image", "labels.x", LIVE), ("gcp:compute/image:Image", "rawDisk.source", REPLACE),
    ("gcp:compute/image:Image", "guestOsFeatures[0].type", REPLACE),
    ("gcp:compute/image:Image", "name", REPLACE),
    ("gcp:compute/firewall:Firewall", "sourceRanges[0]", LIVE), ("gcp:compute/firewall:Firewall", "network", REPLACE),
    ("gcp:compute/subnetwork:Subnetwork", "ipCidrRange", REPLACE),
    ("gcp:compute/subnetwork:Subnetwork", "privateIpGoogleAccess", LIVE),
    ("unknown:type:Thing", "anything", REPLACE),
])
def test_other_types(type_, path, expected):
    assert action_for(type_, path) == expected


def res(urn, type_, inputs, parent=None, deps=None, options=None, custom=True, name=None):
    return {"urn": urn, "type": type_, "name": name or urn.rsplit("::", 1)[1], "parent": parent, "custom": custom,
            "inputs": inputs, "propertyDependencies": deps or {}, "options": options or {}}


def test_computed_value_from_another_resource_is_a_change():
    old = res("u::i", I, {"bootDisk": {"initializeParams": {"image": "<computed>"}}},
              deps={"bootDisk": ["u::image-old"]})
    new = res("u::i", I, {"bootDisk": {"initializeParams": {"image": "<computed>"}}},
              deps={"bootDisk": ["u::image-new"]})
    change = changes.classify(old, new)
    assert change.action == REPLACE and change.reasons == [("bootDisk.initializeParams.image", REPLACE)]


def test_replace_on_changes_option_wins():
    old = res("u::i", I, {"metadata": {"a": "1"}})
    new = res("u::i", I, {"metadata": {"a": "2"}}, options={"replaceOnChanges": ["metadata"]})
    assert changes.classify(old, new).action == REPLACE
    assert changes.classify(old, res("u::i", I, {"metadata": {"a": "2"}})).action == LIVE


def test_create_delete_none():
    r = res("u::i", I, {"name": "x"})
    assert changes.classify(None, r).action == "create"
    assert changes.classify(r, None).action == "delete"
    assert changes.classify(r, r).action == "none"


# ---- rollout over real plans ---------------------------------------------------------------------

def plan_json(project, stack):
    return json.loads(build_plan(project.root, stack).to_json())["resources"]


def two_guests(c, new_for=None):
    images = c["dstack-fleet:images"]
    images["overlay-next"] = json.loads(json.dumps(images["overlay-3eb04ca"]))
    images["overlay-next"]["build"]["guest"]["source"]["commit"] = "2321e30" + "0" * 33
    group = c["dstack-fleet:nodes"][0]
    group["image"] = "overlay-3eb04ca"
    if new_for is not None:
        group["image"] = "overlay-next"
        group["imageOverrides"] = {n: "overlay-3eb04ca" for n in range(5) if n not in new_for}


def rollout_between(project, before, after):
    project.mutate("prod", "roll", before)
    lock_all(project, "roll")
    old = json.loads(build_plan(project.root, "roll").to_json())
    project.mutate("prod", "roll", after)
    lock_all(project, "roll")
    new = json.loads(build_plan(project.root, "roll").to_json())
    return changes.rollout(old["resources"], new["resources"], old["outputs"], new["outputs"])


def test_image_bump_in_one_wave_is_over_the_limit(project):
    groups = rollout_between(project, two_guests, lambda c: two_guests(c, new_for=range(5)))
    g = groups["overlay"]
    assert g.replaced == [f"overlay-{n}" for n in range(5)] and g.over_limit
    (message,) = changes.over_limit(groups, {"overlay-3eb04ca", "overlay-next"}, "overlay-0")
    assert message.startswith("group overlay would take 5 node(s) down at once")
    # the old key is still declared: the step that works pins the nodes that wait to it
    assert message.endswith("keep the others on 'overlay-3eb04ca' for now: set group overlay's imageOverrides to "
                            "{0: overlay-3eb04ca, 2: overlay-3eb04ca, 3: overlay-3eb04ca, 4: overlay-3eb04ca}, then "
                            "shrink it by at most 1 node(s) per change")
    # once the old key is gone there is nothing to pin: targeted waves instead
    (message,) = changes.over_limit(groups, {"overlay-next"}, "overlay-0")
    assert re.search(r"roll it with `make rollout STACK=[a-z0-9-]+`: 5 wave\(s\) of targeted updates", message), message
    assert message.endswith("in this order: overlay-1, overlay-2, overlay-3, overlay-4, overlay-0 (by hand: the "
                            "commands under 'Rollout waves', then the rest with `make up`)")


def test_image_bump_in_waves_stays_within_the_limit(project):
    groups = rollout_between(project, two_guests, lambda c: two_guests(c, new_for=[0]))
    assert groups["overlay"].replaced == ["overlay-0"] and not groups["overlay"].over_limit
    groups = rollout_between(project, lambda c: two_guests(c, new_for=[0]), lambda c: two_guests(c, new_for=[0, 1]))
    assert groups["overlay"].replaced == ["overlay-1"] and changes.over_limit(groups) == []


def test_machine_type_change_stops_every_node(project):
    groups = rollout_between(project, lambda c: None,
                             lambda c: c["dstack-fleet:nodes"][0].update(machineType="c3-standard-22"))
    assert groups["overlay"].stopped == [f"overlay-{n}" for n in range(5)] and groups["overlay"].replaced == []
    assert groups["overlay"].over_limit


def test_label_change_takes_nothing_down(project):
    groups = rollout_between(project, lambda c: None, lambda c: c["dstack-fleet:labels"].update(owner="ops"))
    assert groups["overlay"].unavailable == 0


def test_growing_a_group_creates_without_taking_anything_down(project):
    # the member table is not in the image: growing the overlay leaves every running member's image alone
    groups = rollout_between(project, lambda c: None, lambda c: c["dstack-fleet:nodes"][0].update(count=6))
    assert groups["overlay"].created == ["overlay-5"] and groups["overlay"].unavailable == 0
    groups = rollout_between(project, lambda c: None, lambda c: c["dstack-fleet:nodes"][0].update(retired=[3]))
    assert groups["overlay"].removed == ["overlay-3"] and groups["overlay"].unavailable == 0


def test_a_command_with_an_update_step_updates_in_place():
    C = "command:local:Command"
    old = res("u::c", C, {"create": "true", "update": "gcloud compute instances reset n", "environment": {"K": "1"}})
    new = res("u::c", C, {"create": "true", "update": "gcloud compute instances reset n", "environment": {"K": "2"}})
    assert changes.classify(old, new).action == LIVE  # pulumi-command 1.2.1 runs `update`
    plain = res("u::c", C, {"create": "echo 2"})
    assert changes.classify(res("u::c", C, {"create": "echo 1"}), plain).action == REPLACE
