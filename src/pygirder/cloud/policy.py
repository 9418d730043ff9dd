"""IAM policies: what an operator needs to run pygirder, and what an instance may do.

* :func:`operator_policy` is printed by ``pygirder cloud policy``: the actions every
  ``pygirder cloud`` command calls (setup, status, teardown, and the image and fleet
  commands), scoped to pygirder's names (``pygirder-*``, ``/pygirder/*``) wherever the
  service supports resource-level permissions, and to resources tagged
  ``pygirder:managed=true`` for the EC2 actions that stop or delete things.
* :func:`instance_role_policy` is the inline policy of the instance role: read the
  artifact prefix, publish to the status topic, read its own SSM parameters.  Nothing
  else; in particular an instance cannot terminate anything: it ends itself with
  ``shutdown`` and the launch's ``InstanceInitiatedShutdownBehavior=terminate``.
* :func:`iam_action` maps an API operation to the IAM action that authorises it, so
  an AccessDenied error can name the missing permission.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from .tags import MANAGED_VALUE, TAG_MANAGED

POLICY_VERSION = "2012-10-17"

# IAM action prefixes that differ from the botocore service name.
_SERVICE_PREFIX = {"resourcegroupstaggingapi": "tag", "monitoring": "cloudwatch"}

# Operations whose IAM action is not "<prefix>:<OperationName>".
_ACTION_OVERRIDES: dict[tuple[str, str], str] = {
    ("s3", "HeadBucket"): "s3:ListBucket",
    ("s3", "ListObjectsV2"): "s3:ListBucket",
    ("s3", "ListObjects"): "s3:ListBucket",
    ("s3", "ListObjectVersions"): "s3:ListBucketVersions",
    ("s3", "HeadObject"): "s3:GetObject",
    ("s3", "DeleteObjects"): "s3:DeleteObject",
    ("s3", "ListBuckets"): "s3:ListAllMyBuckets",
    ("s3", "GetPublicAccessBlock"): "s3:GetBucketPublicAccessBlock",
    ("s3", "PutPublicAccessBlock"): "s3:PutBucketPublicAccessBlock",
    ("s3", "GetBucketEncryption"): "s3:GetEncryptionConfiguration",
    ("s3", "PutBucketEncryption"): "s3:PutEncryptionConfiguration",
    ("s3", "GetBucketLifecycleConfiguration"): "s3:GetLifecycleConfiguration",
    ("s3", "PutBucketLifecycleConfiguration"): "s3:PutLifecycleConfiguration",
    ("s3", "DeleteBucketLifecycle"): "s3:PutLifecycleConfiguration",
    ("s3", "CreateMultipartUpload"): "s3:PutObject",
    ("s3", "UploadPart"): "s3:PutObject",
    ("s3", "CompleteMultipartUpload"): "s3:PutObject",
    ("budgets", "CreateBudget"): "budgets:ModifyBudget",
    ("budgets", "UpdateBudget"): "budgets:ModifyBudget",
    ("budgets", "DeleteBudget"): "budgets:ModifyBudget",
    ("budgets", "CreateNotification"): "budgets:ModifyBudget",
    ("budgets", "DeleteNotification"): "budgets:ModifyBudget",
    ("budgets", "CreateSubscriber"): "budgets:ModifyBudget",
    ("budgets", "DeleteSubscriber"): "budgets:ModifyBudget",
    ("budgets", "DescribeBudget"): "budgets:ViewBudget",
    ("budgets", "DescribeBudgets"): "budgets:ViewBudget",
    ("budgets", "DescribeNotificationsForBudget"): "budgets:ViewBudget",
    ("budgets", "DescribeSubscribersForNotification"): "budgets:ViewBudget",
}


def iam_action(service: str, operation: str) -> str:
    """The IAM action that authorises ``operation`` (PascalCase) of a botocore service."""
    override = _ACTION_OVERRIDES.get((service, operation))
    if override:
        return override
    return f"{_SERVICE_PREFIX.get(service, service)}:{operation}"


def partition(region: str) -> str:
    """The ARN partition of a region: ``aws``, ``aws-cn`` or ``aws-us-gov``."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


# ---------------------------------------------------------------- the operator

# Describe* is read-only by definition (every Describe action only lists); one pattern
# keeps the policy under IAM's size limit for a managed policy.
EC2_READ = [
    "ec2:Describe*",
]

# EC2 actions that create tagged resources.  EC2 names a new resource only after it
# exists, so these are allowed on any EC2 ARN on condition that the request tags what
# it makes ``pygirder:managed=true`` (``aws:RequestTag``); the existing
# resources a create refers to (the VPC of a subnet, the subnet and security group of
# an instance) need ``pygirder:managed=true`` on them (statement below).
EC2_CREATE = [
    "ec2:CreateVpc",
    "ec2:CreateSubnet",
    "ec2:CreateInternetGateway",
    "ec2:CreateRouteTable",
    "ec2:CreateSecurityGroup",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:AuthorizeSecurityGroupEgress",
    "ec2:AllocateAddress",
    "ec2:CreateNatGateway",
    "ec2:CreateVpcEndpoint",
    "ec2:ImportKeyPair",
    "ec2:CreateKeyPair",
    "ec2:RunInstances",
    "ec2:CreateLaunchTemplate",
    "ec2:CreateFleet",
    "ec2:CreateImage",
]

# The creates that refer to resources that exist (a subnet's VPC, an instance's subnet,
# security group, key pair and launch template, a NAT gateway's address, an image's
# instance): allowed only when those are pygirder's.
EC2_CREATE_FROM_OWN = [
    "ec2:CreateSubnet",
    "ec2:CreateRouteTable",
    "ec2:CreateSecurityGroup",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:AuthorizeSecurityGroupEgress",
    "ec2:CreateNatGateway",
    "ec2:CreateVpcEndpoint",
    "ec2:RunInstances",
    "ec2:CreateFleet",
    "ec2:CreateImage",
]

# EC2 actions that change a resource that exists: only one tagged pygirder:managed.
EC2_MODIFY = [
    "ec2:ModifyVpcAttribute",
    "ec2:ModifySubnetAttribute",
    "ec2:AttachInternetGateway",
    "ec2:AssociateRouteTable",
    "ec2:DisassociateRouteTable",
    "ec2:CreateRoute",
    "ec2:ReplaceRoute",
    "ec2:RevokeSecurityGroupIngress",
    "ec2:RevokeSecurityGroupEgress",
    "ec2:ModifyVpcEndpoint",
    "ec2:ModifyInstanceAttribute",
    "ec2:CreateLaunchTemplateVersion",
    "ec2:ModifyLaunchTemplate",
]

# EC2 actions that stop, start or delete: only on resources tagged pygirder:managed.
EC2_OWN_ONLY = [
    "ec2:StartInstances",
    "ec2:StopInstances",
    "ec2:TerminateInstances",
    "ec2:DeleteFleets",
    "ec2:CancelSpotInstanceRequests",
    "ec2:DeleteLaunchTemplate",
    "ec2:DeregisterImage",
    "ec2:ModifyImageAttribute",
    "ec2:DeleteSnapshot",
    "ec2:DeleteVolume",
    "ec2:DeleteKeyPair",
    "ec2:DeleteVpcEndpoints",
    "ec2:DeleteNatGateway",
    "ec2:ReleaseAddress",
    "ec2:DeleteSecurityGroup",
    "ec2:DeleteRoute",
    "ec2:DeleteRouteTable",
    "ec2:DetachInternetGateway",
    "ec2:DeleteInternetGateway",
    "ec2:DeleteSubnet",
    "ec2:DeleteVpc",
]

# The permissions boundary every role pygirder creates carries (one per account, shared
# by every setup): the most any instance role may ever do, whatever its inline policy
# says.  The operator may create it when it is missing but never change or delete it,
# and may create or change a role only when the role carries it.
BOUNDARY_NAME = "pygirder-boundary"
BOUNDARY_PATH = "/pygirder/"
# The instance role and profile of every setup: ``/pygirder/pygirder-<name>-instance``.
ROLE_PATH = "/pygirder/"
INSTANCE_ROLE_PATTERN = "pygirder-*-instance"
# The role and profile of one fleet's redis node when it runs the fleet controller
# (``up`` makes them, ``down`` removes them): an instance role of INSTANCE_ROLE_PATTERN,
# so the operator may make it on the same terms (with the boundary) and no other.
CONTROLLER_ROLE_PATTERN = "pygirder-*-fleet-instance"

# Role actions that can give a role permissions: allowed only while the role carries the
# boundary (iam:PermissionsBoundary), so a role's inline policy never exceeds it.
IAM_ROLE_BOUNDED = [
    "iam:CreateRole",
    "iam:PutRolePolicy",
    "iam:PutRolePermissionsBoundary",
    "iam:DeleteRolePolicy",
]

# Role actions that cannot add permissions.  There is no iam:UpdateAssumeRolePolicy: a
# role whose trust policy drifted is deleted and created again.
IAM_ROLE = [
    "iam:DeleteRole",
    "iam:GetRole",
    "iam:TagRole",
    "iam:ListRoleTags",
    "iam:GetRolePolicy",
    "iam:ListRolePolicies",
    "iam:ListAttachedRolePolicies",
    "iam:ListInstanceProfilesForRole",
]

IAM_PROFILE = [
    "iam:CreateInstanceProfile",
    "iam:DeleteInstanceProfile",
    "iam:GetInstanceProfile",
    "iam:TagInstanceProfile",
    "iam:AddRoleToInstanceProfile",
    "iam:RemoveRoleFromInstanceProfile",
]

# Creating the boundary once; it cannot be edited afterwards (see BOUNDARY_LOCKED).
IAM_BOUNDARY = [
    "iam:CreatePolicy",
    "iam:TagPolicy",
    "iam:GetPolicy",
    "iam:GetPolicyVersion",
]

# Never allowed (tests check it): changing or deleting the boundary, removing it from a
# role, and changing who may assume a role.  An explicit Deny would not fit IAM's size
# limit of a managed policy, and nothing here allows them.
BOUNDARY_LOCKED = [
    "iam:CreatePolicyVersion",
    "iam:SetDefaultPolicyVersion",
    "iam:DeletePolicyVersion",
    "iam:DeletePolicy",
    "iam:DeleteRolePermissionsBoundary",
    "iam:UpdateAssumeRolePolicy",
]

S3_BUCKET = [
    "s3:CreateBucket",
    "s3:DeleteBucket",
    "s3:ListBucket",
    "s3:ListBucketVersions",
    "s3:GetBucketTagging",
    "s3:PutBucketTagging",
    "s3:GetBucketPublicAccessBlock",
    "s3:PutBucketPublicAccessBlock",
    "s3:GetEncryptionConfiguration",
    "s3:PutEncryptionConfiguration",
    "s3:GetLifecycleConfiguration",
    "s3:PutLifecycleConfiguration",
]

S3_OBJECTS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:AbortMultipartUpload",
]

SNS_TOPICS = [
    "sns:CreateTopic",
    "sns:DeleteTopic",
    "sns:GetTopicAttributes",
    "sns:SetTopicAttributes",
    "sns:Subscribe",
    "sns:ListSubscriptionsByTopic",
    "sns:TagResource",
    "sns:ListTagsForResource",
    "sns:Publish",
]

# Subscription actions name a subscription ARN, which IAM cannot scope: they accept
# only "*".  The worst they allow is reading or dropping a subscription.
SNS_SUBSCRIPTIONS = [
    "sns:GetSubscriptionAttributes",
    "sns:SetSubscriptionAttributes",
    "sns:Unsubscribe",
]

SQS_QUEUES = [
    "sqs:CreateQueue",
    "sqs:DeleteQueue",
    "sqs:GetQueueUrl",
    "sqs:GetQueueAttributes",
    "sqs:SetQueueAttributes",
    "sqs:TagQueue",
    "sqs:ListQueueTags",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
]

CLOUDWATCH_ALARMS = [
    "cloudwatch:PutMetricAlarm",
    "cloudwatch:DeleteAlarms",
    "cloudwatch:TagResource",
    "cloudwatch:ListTagsForResource",
]

BUDGETS = [
    "budgets:ViewBudget",
    "budgets:ModifyBudget",
    "budgets:TagResource",
    "budgets:ListTagsForResource",
]

SSM_OWN = [
    "ssm:GetParameter",
    "ssm:GetParameters",
    "ssm:GetParametersByPath",
    "ssm:PutParameter",
    "ssm:DeleteParameter",
    "ssm:DeleteParameters",
    "ssm:AddTagsToResource",
    "ssm:ListTagsForResource",
]

ACCOUNT_READ = [
    "sts:GetCallerIdentity",
    "tag:GetResources",
    "cloudwatch:DescribeAlarms",
    "ssm:DescribeParameters",
    "iam:ListRoles",  # finds the controller roles fleets left (below /pygirder/)
]


def boundary_arn(partition_name: str = "aws", account_id: str = "*") -> str:
    """The ARN of the permissions boundary (``*`` for the account: in the operator policy)."""
    return f"arn:{partition_name}:iam::{account_id}:policy{BOUNDARY_PATH}{BOUNDARY_NAME}"


def operator_policy(*, bucket: str | None = None, partition_name: str = "aws") -> dict[str, Any]:
    """The IAM policy an operator needs to run every ``pygirder cloud`` command.

    Names are scoped to ``pygirder-*`` (any ``[cloud] name``) in every account; pass
    ``bucket`` when ``[cloud] bucket`` overrides the default bucket name.  Nothing in it
    leads to more: every role it may create or change carries the boundary, which it
    cannot change; EC2 creates must tag what they make, and every change or delete
    needs the tag on the resource, which only a create can put there.
    """
    p = partition_name
    buckets = [f"arn:{p}:s3:::pygirder-*"]  # "*" also matches "/": the objects too
    if bucket and not fnmatch.fnmatchcase(bucket, "pygirder-*"):
        buckets += [f"arn:{p}:s3:::{bucket}", f"arn:{p}:s3:::{bucket}/*"]
    managed = {f"aws:ResourceTag/{TAG_MANAGED}": MANAGED_VALUE}
    roles = f"arn:{p}:iam::*:role{ROLE_PATH}{INSTANCE_ROLE_PATTERN}"
    profiles = f"arn:{p}:iam::*:instance-profile{ROLE_PATH}{INSTANCE_ROLE_PATTERN}"
    boundary = boundary_arn(p)
    statements = [
        _allow("Read", EC2_READ + ACCOUNT_READ, "*"),
        {
            **_allow(
                "CreateTaggedEc2",
                EC2_CREATE,
                f"arn:{p}:ec2:*:*:*",
            ),
            "Condition": {"StringEquals": {f"aws:RequestTag/{TAG_MANAGED}": MANAGED_VALUE}},
        },
        {
            # What a create refers to (the VPC of a subnet, the subnet, security group,
            # key and template of an instance), every change and every stop or delete:
            # pygirder's resources only.
            **_allow(
                "OwnEc2Only",
                EC2_CREATE_FROM_OWN + EC2_MODIFY + EC2_OWN_ONLY,
                "*",
            ),
            "Condition": {"StringEquals": managed},
        },
        {
            # The image of a launch (Amazon Linux, or a template image) and its snapshots
            # are only read by it: Amazon's or this account's.
            **_allow("LaunchImages", ["ec2:RunInstances", "ec2:CreateFleet"], "*"),
            "Condition": {"StringEquals": {"ec2:Owner": ["amazon", "${aws:PrincipalAccount}"]}},
        },
        {
            **_allow("TagAtCreation", ["ec2:CreateTags"], "*"),
            # ec2:CreateAction exists only while a create tags what it makes.
            "Condition": {"Null": {"ec2:CreateAction": "false"}},
        },
        {
            **_allow("BoundedRoles", IAM_ROLE_BOUNDED, roles),
            "Condition": {"StringLike": {"iam:PermissionsBoundary": boundary}},
        },
        _allow("RolesAndProfiles", IAM_ROLE + IAM_PROFILE, [roles, profiles]),
        _allow("CreateBoundary", IAM_BOUNDARY, boundary),
        {
            **_allow("PassRoleToEc2", ["iam:PassRole"], roles),
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        },
        {
            **_allow(
                "SpotLinkedRoles",
                ["iam:CreateServiceLinkedRole"],
                f"arn:{p}:iam::*:role/aws-service-role/*",
            ),
            "Condition": {
                "StringEquals": {
                    "iam:AWSServiceName": ["spot.amazonaws.com", "ec2fleet.amazonaws.com"]
                }
            },
        },
        _allow("Artifacts", S3_BUCKET + S3_OBJECTS, buckets),
        _allow("Topics", SNS_TOPICS, f"arn:{p}:sns:*:*:pygirder-*"),
        _allow("Subscriptions", SNS_SUBSCRIPTIONS, "*"),
        _allow("Queue", SQS_QUEUES, f"arn:{p}:sqs:*:*:pygirder-*"),
        _allow("Alarms", CLOUDWATCH_ALARMS, f"arn:{p}:cloudwatch:*:*:alarm:pygirder-*"),
        _allow("Budget", BUDGETS, f"arn:{p}:budgets::*:budget/pygirder-*"),
        _allow(
            # Amazon Linux's public parameters are AWS's: only readable, whatever this says.
            "Parameters",
            SSM_OWN,
            [
                f"arn:{p}:ssm:*:*:parameter/pygirder/*",
                f"arn:{p}:ssm:*:*:parameter/aws/service/ami-amazon-linux-latest/*",
            ],
        ),
    ]
    return {"Version": POLICY_VERSION, "Statement": statements}


def _allow(sid: str, actions: list[str], resource: str | list[str]) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(set(actions)), "Resource": resource}


def allowed_actions(policy: dict[str, Any]) -> list[str]:
    """Every action pattern the policy's Allow statements name."""
    out: list[str] = []
    for statement in policy["Statement"]:
        if statement.get("Effect") == "Allow":
            actions = statement.get("Action", [])
            out.extend([actions] if isinstance(actions, str) else actions)
    return out


def allows_action(policy: dict[str, Any], action: str) -> bool:
    """True when some Allow statement names ``action`` (resources and conditions aside)."""
    return any(
        fnmatch.fnmatchcase(action.lower(), pattern.lower()) for pattern in allowed_actions(policy)
    )


# ----------------------------------------------------------------- the instance


def instance_trust_policy() -> dict[str, Any]:
    """Who may assume the instance role: EC2, for instances given the profile."""
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }


def instance_role_policy(
    *,
    name: str,
    region: str,
    account_id: str,
    bucket: str,
    artifact_prefix: str,
    topic_arn: str,
    result_prefix: str = "results/",
) -> dict[str, Any]:
    """Least privilege for an instance: read artifacts, read and write the durable
    results, publish status, read its own parameters."""
    p = partition(region)
    parameters = f"arn:{p}:ssm:{region}:{account_id}:parameter/pygirder/{name}"
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "ReadArtifacts",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": f"arn:{p}:s3:::{bucket}/{artifact_prefix}*",
            },
            {
                "Sid": "ReadWriteResults",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": f"arn:{p}:s3:::{bucket}/{result_prefix}*",
            },
            {
                # listing lets a read of a missing result say 404, not 403
                "Sid": "ListArtifacts",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:{p}:s3:::{bucket}",
                "Condition": {
                    "StringLike": {"s3:prefix": [f"{artifact_prefix}*", f"{result_prefix}*"]}
                },
            },
            {
                "Sid": "PublishStatus",
                "Effect": "Allow",
                "Action": "sns:Publish",
                "Resource": topic_arn,
            },
            {
                "Sid": "ReadOwnFleetParameters",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"],
                "Resource": [parameters, f"{parameters}/*"],
            },
        ],
    }


def boundary_policy(partition_name: str = "aws") -> dict[str, Any]:
    """The permissions boundary of every role pygirder creates, in any setup.

    The ceiling of :func:`instance_role_policy` for every ``[cloud] name``: read
    objects of this account's buckets, write and delete them under ``results/`` only,
    publish to ``pygirder-*`` topics, read parameters under ``/pygirder/``; and of a
    fleet controller's policy: launch and terminate only what is tagged
    ``pygirder:managed=true`` (as the operator may), pass only the instance roles,
    read the ``pygirder-*`` status queues.  A role's
    effective rights are the intersection of this and its inline policy, so even an
    operator who rewrites the inline policy cannot make an instance (or anyone passing
    its role) more than that.
    """
    p = partition_name
    own_account = {"StringEquals": {"aws:ResourceAccount": "${aws:PrincipalAccount}"}}
    managed = {f"aws:ResourceTag/{TAG_MANAGED}": MANAGED_VALUE}
    launch = ["ec2:CreateFleet", "ec2:RunInstances"]
    # The ceiling of a fleet controller (its inline policy narrows it to one fleet):
    # the operator's own rules for launching and terminating, nothing more.
    fleet_control = [
        {"Sid": "LaunchTaggedInstances", "Effect": "Allow", "Action": launch,
         "Resource": f"arn:{p}:ec2:*:*:*",
         "Condition": {"StringEquals": {f"aws:RequestTag/{TAG_MANAGED}": MANAGED_VALUE}}},
        {"Sid": "LaunchFromOwnResources", "Effect": "Allow", "Action": launch, "Resource": "*",
         "Condition": {"StringEquals": managed}},
        {"Sid": "LaunchImages", "Effect": "Allow", "Action": launch, "Resource": "*",
         "Condition": {"StringEquals": {"ec2:Owner": ["amazon", "${aws:PrincipalAccount}"]}}},
        {"Sid": "TagAtLaunch", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
         "Condition": {"Null": {"ec2:CreateAction": "false"}}},
        {"Sid": "TerminateOwnInstances", "Effect": "Allow", "Action": "ec2:TerminateInstances",
         "Resource": f"arn:{p}:ec2:*:*:instance/*", "Condition": {"StringEquals": managed}},
        {"Sid": "SeeInstances", "Effect": "Allow",
         "Action": ["ec2:DescribeInstances", "ec2:DescribeLaunchTemplates"], "Resource": "*"},
        {"Sid": "PassInstanceRolesToEc2", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:{p}:iam::*:role{ROLE_PATH}{INSTANCE_ROLE_PATTERN}",
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
        {"Sid": "ReadStatusQueues", "Effect": "Allow",
         "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage"],
         "Resource": f"arn:{p}:sqs:*:*:pygirder-*", "Condition": own_account},
    ]  # fmt: skip
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "ReadArtifactsOfThisAccount",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:{p}:s3:::*", f"arn:{p}:s3:::*/*"],
                "Condition": own_account,
            },
            {
                "Sid": "WriteResultsOfThisAccount",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:DeleteObject"],
                "Resource": f"arn:{p}:s3:::*/results/*",
                "Condition": own_account,
            },
            {
                "Sid": "PublishStatus",
                "Effect": "Allow",
                "Action": "sns:Publish",
                "Resource": f"arn:{p}:sns:*:*:pygirder-*",
                "Condition": own_account,
            },
            {
                "Sid": "ReadFleetParameters",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"],
                "Resource": f"arn:{p}:ssm:*:*:parameter/pygirder/*",
                "Condition": own_account,
            },
            *fleet_control,
        ],
    }
