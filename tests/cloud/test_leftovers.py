"""One table of leftover kinds for down, sweep and teardown, against moto.

The scopes decide what counts: a teardown takes everything of its setup (image
builders too), down and sweep only what a fleet made, and nobody ever takes the NAT
instance.  Deletes share one policy: gone is fine, dependents are waited out.
"""

from __future__ import annotations

from pygirder.cloud.leftovers import BY_KEY, KINDS, Scope, find
from pygirder.cloud.tags import TAG_COMPONENT, TAG_FLEET, TAG_MANAGED, TAG_NAME, TAG_ROLE

FLEET = "fl-20260101-0000-0123456789abcdef"
AMI = "ami-12c6146b"


def _tags(name: str = "t", **extra: str) -> list[dict[str, str]]:
    tags = {TAG_MANAGED: "true", TAG_NAME: name, **extra}
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _instance(ec2, tags: list[dict[str, str]]) -> str:
    return ec2.run_instances(
        ImageId=AMI, MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]  # fmt: skip


def test_each_scope_counts_what_it_should_and_never_the_nat(config, make_aws, boto) -> None:
    aws_, _, _ = make_aws(config)
    ec2, ssm = boto("ec2"), boto("ssm")
    member = _instance(ec2, _tags(**{TAG_FLEET: FLEET, TAG_ROLE: "worker"}))
    builder = _instance(ec2, _tags(**{TAG_ROLE: "image-builder"}))
    nat = _instance(ec2, _tags(**{TAG_COMPONENT: "nat-instance"}))
    other = _instance(ec2, _tags("other", **{TAG_FLEET: FLEET}))
    unmanaged = _instance(
        ec2, [{"Key": TAG_NAME, "Value": "t"}, {"Key": TAG_FLEET, "Value": FLEET}]
    )
    ssm.put_parameter(
        Name=f"/pygirder/t/{FLEET}/redis-password", Value="x", Type="SecureString",
        Tags=_tags(**{TAG_FLEET: FLEET}),
    )  # fmt: skip
    ssm.put_parameter(Name="/pygirder/t/image", Value="ami", Type="String", Tags=_tags())

    def ids(scope: Scope, key: str) -> set[str]:
        return {item.id for item in BY_KEY[key].find(aws_, scope)}

    assert ids(Scope.setup("t"), "instances") == {member, builder}
    assert ids(Scope("t"), "instances") == {member}
    assert ids(Scope("t", FLEET), "instances") == {member}
    assert ids(Scope(None), "instances") == {member, other}
    assert nat not in ids(Scope.setup("t"), "instances") | ids(Scope(None), "instances")
    assert unmanaged not in ids(Scope(None), "instances")
    assert ids(Scope.setup("t"), "ssm-parameters") == {
        f"/pygirder/t/{FLEET}/redis-password", "/pygirder/t/image",
    }  # fmt: skip
    assert ids(Scope("t", FLEET), "ssm-parameters") == {f"/pygirder/t/{FLEET}/redis-password"}
    [found] = BY_KEY["instances"].find(aws_, Scope("t", FLEET))
    assert (found.setup, found.fleet, found.label) == ("t", FLEET, f"fleet {FLEET}")
    # Down and sweep look at what fleets make; teardown at images and snapshots too.
    assert set(find(aws_, Scope("t"))) == {k.key for k in KINDS if k.fleet}
    assert set(find(aws_, Scope.setup("t"))) == {k.key for k in KINDS}


def test_a_delete_waits_out_dependents_and_already_gone_is_fine(config, make_aws, boto) -> None:
    aws_, faults, sleeps = make_aws(config)
    tags = _tags(**{TAG_FLEET: FLEET})
    template = boto("ec2").create_launch_template(
        LaunchTemplateName="pygirder-t-worker", LaunchTemplateData={"ImageId": AMI},
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
    )["LaunchTemplate"]["LaunchTemplateId"]  # fmt: skip
    kind = BY_KEY["launch-templates"]
    faults.fail("ec2.DeleteLaunchTemplate", "DependencyViolation", times=2)
    said = []
    kind.delete(aws_, [template], on_retry=lambda exc, delay, attempt: said.append(attempt))
    assert faults.calls.count("ec2.DeleteLaunchTemplate") == 3
    assert sleeps == [2.0, 4.0] and said == [2, 3]
    assert kind.find(aws_, Scope("t", FLEET)) == []
    kind.delete(aws_, [template])  # gone already: no error
    assert faults.calls.count("ec2.DeleteLaunchTemplate") == 4
