"""A daily snapshot schedule for data disks in one region (on in prod)."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

SNAPSHOT_HOUR_UTC = "03:00"
RETENTION_DAYS = 14


class SnapshotSchedule(pulumi.ComponentResource):
    policy: gcp.compute.ResourcePolicy

    def __init__(self, region: str, name: str, project: str, labels: dict[str, str],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:nodes:SnapshotSchedule", f"snapshots-{region}", {}, opts)
        self.policy = gcp.compute.ResourcePolicy(
            f"snapshots-{region}",
            name=name,
            project=project,
            region=region,
            description=f"Daily data-disk snapshots, kept {RETENTION_DAYS} days",
            snapshot_schedule_policy={
                "schedule": {"daily_schedule": {"days_in_cycle": 1, "start_time": SNAPSHOT_HOUR_UTC}},
                "retention_policy": {"max_retention_days": RETENTION_DAYS,
                                     "on_source_disk_delete": "KEEP_AUTO_SNAPSHOTS"},
                "snapshot_properties": {"labels": labels, "storage_locations": region},
            },
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"name": self.policy.name})
