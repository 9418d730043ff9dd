"""What a fleet's instances are launched with: one launch template per role, its
user-data (the agent's commands, see :mod:`pygirder.cloud.instance.userdata`) and the
fleet's Redis password, a tagged SecureString only the fleet's instances can read.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..aws import Aws
from ..config import CloudConfig
from ..instance.common import Role
from ..tags import as_tag_list
from .members import RoleLaunch
from .naming import fleet_tags


@dataclass
class Blueprint:
    """What every instance of one fleet boots: the image, the artifact and its imports,
    in one launch template per role; ``res`` is :func:`account_resources`' answer."""

    aws: Aws
    config: CloudConfig
    res: dict[str, Any]
    fleet: str
    expires: datetime
    image_id: str
    artifact_uri: str
    artifact_sha256: str
    imports: tuple[str, ...]
    processes: str
    spot_interval_s: float
    controller: bool = False
    """The redis node also runs the fleet controller (it reads the status queue)."""
    redis_profile_arn: str | None = None
    """The redis node's instance profile when it is not the setup's: the controller's
    (:mod:`.controller_role`)."""
    role_images: dict[str, str] = field(default_factory=dict)
    """Role -> its AMI when it is not ``image_id`` (a role of another architecture)."""

    def store_password(self) -> None:
        """The fleet's Redis password, a tagged SecureString only the fleet can read."""
        from ..instance.announce import redis_password_parameter

        self.aws.call(
            "ssm",
            "put_parameter",
            Name=redis_password_parameter(self.config.name, self.fleet),
            Description=f"Redis password of pygirder fleet {self.fleet}",
            Value=secrets.token_urlsafe(32),
            Type="SecureString",
            Tags=as_tag_list(fleet_tags(self.config, self.fleet, self.expires)),
        )

    def template(self, launch: RoleLaunch, redis: str | None) -> None:
        """The launch template of one role: everything but the type and the subnet;
        ``redis`` is the grid's URL (None for the redis node itself)."""
        user_data = self.user_data(launch, redis)
        tags = as_tag_list(fleet_tags(self.config, self.fleet, self.expires, str(launch.role)))
        profile = self.res["instance_profile_arn"]
        if launch.role is Role.REDIS and self.redis_profile_arn:
            profile = self.redis_profile_arn
        data = {
            "ImageId": self.role_images.get(str(launch.role), self.image_id),
            "UserData": base64.b64encode(user_data.encode()).decode(),
            "IamInstanceProfile": {"Arn": profile},
            "SecurityGroupIds": [self.res["security_group_id"]],
            "KeyName": self.res["key_name"],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 1,
                "InstanceMetadataTags": "enabled",
            },
            "TagSpecifications": [
                {"ResourceType": kind, "Tags": tags}
                for kind in ("instance", "volume", "network-interface", "spot-instances-request")
            ],
        }
        got = self.aws.call(
            "ec2",
            "create_launch_template",
            LaunchTemplateName=f"pygirder-{self.config.name}-{launch.launch_id}",
            LaunchTemplateData=data,
            ClientToken=f"{launch.launch_id}-lt"[:64],
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
        )
        launch.template_id = got["LaunchTemplate"]["LaunchTemplateId"]

    def user_data(self, launch: RoleLaunch, redis: str | None) -> str:
        from ..instance.userdata import render_user_data

        return render_user_data(
            topic_arn=self.res["topic_arn"],
            region=self.config.region,
            launch_id=launch.launch_id,
            fleet=self.fleet,
            name=self.config.name,
            role=launch.role,
            artifact_uri=self.artifact_uri,
            artifact_sha256=self.artifact_sha256,
            redis=redis,
            pool=launch.pool,
            parent=launch.parent,
            imports=self.imports if launch.role is Role.WORKER else (),
            processes=self.processes,
            expires=self.expires,
            spot_interval_s=self.spot_interval_s,
            controller_queue_url=(
                self.res["queue_url"] if launch.role is Role.REDIS and self.controller else None
            ),
        )
