"""Code that runs on the fleet's EC2 instances, never on the operator's machine.

:mod:`.agent` is ``python -m pygirder.cloud.instance.agent``: it announces the
instance, fetches and installs the artifact (:mod:`.install`) and supervises the grid
service; :mod:`.userdata` renders the user-data that calls it; ``pygirder-boot.sh``
(the image's boot robot) and ``image-bake.sh`` (the bake script) are shipped as
package data.  Nothing here
reads the operator's configuration or credentials: an instance has its own role.
"""

from importlib import resources

BAKE_TEMPLATE = "image-bake.sh"
BOOT_ROBOT = "pygirder-boot.sh"


def bake_template() -> str:
    """The bake script's template (``@NAME@`` placeholders), as shipped."""
    return resources.files(__package__).joinpath(BAKE_TEMPLATE).read_text()


def boot_robot() -> bytes:
    """The boot robot an image runs at every boot, as shipped."""
    return resources.files(__package__).joinpath(BOOT_ROBOT).read_bytes()
