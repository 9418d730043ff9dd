"""Code that runs on the fleet's EC2 instances, never on the operator's machine.

:mod:`.agent` is ``python -m pygirder.cloud.instance.agent``: it announces the
instance, fetches the artifact and supervises the grid service; :mod:`.userdata`
renders the user-data that calls it; ``pygirder-boot.sh`` (the image's boot robot)
and ``image-bake.sh`` (the bake script) are shipped as package data.  Nothing here
reads the operator's configuration or credentials: an instance has its own role.
"""
