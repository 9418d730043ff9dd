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

EC2_READ = [
    "ec2:DescribeAvailabilityZones",
    "ec2:DescribeVpcs",
    "ec2:DescribeVpcAttribute",
    "ec2:DescribeSubnets",
    "ec2:DescribeInternetGateways",
    "ec2:DescribeRouteTables",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSecurityGroupRules",
    "ec2:DescribeNatGateways",
    "ec2:DescribeAddresses",
    "ec2:DescribeVpcEndpoints",
    "ec2:DescribeKeyPairs",
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceAttribute",
    "ec2:DescribeInstanceStatus",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeInstanceTypeOfferings",
    "ec2:DescribeImages",
    "ec2:DescribeSnapshots",
    "ec2:DescribeVolumes",
    "ec2:DescribeLaunchTemplates",
    "ec2:DescribeLaunchTemplateVersions",
    "ec2:DescribeFleets",
    "ec2:DescribeFleetInstances",
    "ec2:DescribeSpotInstanceRequests",
    "ec2:DescribeSpotPriceHistory",
    "ec2:DescribeTags",
    "ec2:GetConsoleOutput",
]

# EC2 actions that create resources or change their configuration.  Most EC2 create
# actions cannot be scoped by resource name, so these use "*"; everything pygirder
# creates is tagged in the same call (TagSpecifications).
EC2_CREATE = [
    "ec2:CreateVpc",
    "ec2:ModifyVpcAttribute",
    "ec2:CreateSubnet",
    "ec2:ModifySubnetAttribute",
    "ec2:CreateInternetGateway",
    "ec2:AttachInternetGateway",
    "ec2:CreateRouteTable",
    "ec2:AssociateRouteTable",
    "ec2:DisassociateRouteTable",
    "ec2:CreateRoute",
    "ec2:ReplaceRoute",
    "ec2:CreateSecurityGroup",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:AuthorizeSecurityGroupEgress",
    "ec2:RevokeSecurityGroupIngress",
    "ec2:RevokeSecurityGroupEgress",
    "ec2:AllocateAddress",
    "ec2:CreateNatGateway",
    "ec2:CreateVpcEndpoint",
    "ec2:ModifyVpcEndpoint",
    "ec2:ImportKeyPair",
    "ec2:CreateKeyPair",
    "ec2:RunInstances",
    "ec2:ModifyInstanceAttribute",
    "ec2:CreateLaunchTemplate",
    "ec2:CreateLaunchTemplateVersion",
    "ec2:ModifyLaunchTemplate",
    "ec2:CreateFleet",
    "ec2:CreateImage",
    "ec2:CreateTags",
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

IAM_ROLE = [
    "iam:CreateRole",
    "iam:DeleteRole",
    "iam:GetRole",
    "iam:TagRole",
    "iam:ListRoleTags",
    "iam:UpdateAssumeRolePolicy",
    "iam:PutRolePolicy",
    "iam:GetRolePolicy",
    "iam:DeleteRolePolicy",
    "iam:ListRolePolicies",
    "iam:ListAttachedRolePolicies",
    "iam:ListInstanceProfilesForRole",
    "iam:CreateInstanceProfile",
    "iam:DeleteInstanceProfile",
    "iam:GetInstanceProfile",
    "iam:TagInstanceProfile",
    "iam:AddRoleToInstanceProfile",
    "iam:RemoveRoleFromInstanceProfile",
]

S3_BUCKET = [
    "s3:CreateBucket",
    "s3:DeleteBucket",
    "s3:ListBucket",
    "s3:ListBucketVersions",
    "s3:GetBucketLocation",
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
    "sns:Unsubscribe",
    "sns:GetSubscriptionAttributes",
    "sns:SetSubscriptionAttributes",
    "sns:ListSubscriptionsByTopic",
    "sns:TagResource",
    "sns:ListTagsForResource",
    "sns:Publish",
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
    "sqs:PurgeQueue",
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
]


def operator_policy(*, bucket: str | None = None, partition_name: str = "aws") -> dict[str, Any]:
    """The IAM policy an operator needs to run every ``pygirder cloud`` command.

    Names are scoped to ``pygirder-*`` (any ``[cloud] name``) in every account; pass
    ``bucket`` when ``[cloud] bucket`` overrides the default bucket name.
    """
    p = partition_name
    buckets = [f"arn:{p}:s3:::pygirder-*"]
    objects = [f"arn:{p}:s3:::pygirder-*/*"]
    if bucket and not fnmatch.fnmatchcase(bucket, "pygirder-*"):
        buckets.append(f"arn:{p}:s3:::{bucket}")
        objects.append(f"arn:{p}:s3:::{bucket}/*")
    statements = [
        _allow("DescribeAndIdentify", EC2_READ + ACCOUNT_READ, "*"),
        _allow("CreateTaggedEc2Resources", EC2_CREATE, "*"),
        {
            **_allow("StopAndDeleteOnlyPygirderEc2Resources", EC2_OWN_ONLY, "*"),
            "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": MANAGED_VALUE}},
        },
        _allow(
            "InstanceRoleAndProfile",
            IAM_ROLE,
            [f"arn:{p}:iam::*:role/pygirder/*", f"arn:{p}:iam::*:instance-profile/pygirder/*"],
        ),
        {
            **_allow("PassInstanceRoleToEc2", ["iam:PassRole"], f"arn:{p}:iam::*:role/pygirder/*"),
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        },
        {
            **_allow(
                "SpotServiceLinkedRoles",
                ["iam:CreateServiceLinkedRole"],
                f"arn:{p}:iam::*:role/aws-service-role/*",
            ),
            "Condition": {
                "StringEquals": {
                    "iam:AWSServiceName": ["spot.amazonaws.com", "ec2fleet.amazonaws.com"]
                }
            },
        },
        _allow("ArtifactBucket", S3_BUCKET, buckets),
        _allow("ArtifactObjects", S3_OBJECTS, objects),
        _allow("StatusAndBillingTopics", SNS_TOPICS, f"arn:{p}:sns:*:*:pygirder-*"),
        _allow("StatusQueue", SQS_QUEUES, f"arn:{p}:sqs:*:*:pygirder-*"),
        _allow("BillingAlarms", CLOUDWATCH_ALARMS, f"arn:{p}:cloudwatch:*:*:alarm:pygirder-*"),
        _allow("Budget", BUDGETS, f"arn:{p}:budgets::*:budget/pygirder-*"),
        _allow("FleetParameters", SSM_OWN, f"arn:{p}:ssm:*:*:parameter/pygirder/*"),
        _allow(
            "PublicAmazonLinuxAmiParameters",
            ["ssm:GetParameter", "ssm:GetParameters"],
            f"arn:{p}:ssm:*::parameter/aws/service/ami-amazon-linux-latest/*",
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
) -> dict[str, Any]:
    """Least privilege for an instance: artifacts, status topic, its own parameters."""
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
                "Sid": "ListArtifacts",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:{p}:s3:::{bucket}",
                "Condition": {"StringLike": {"s3:prefix": [f"{artifact_prefix}*"]}},
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
