"""The template image: :mod:`.build` bakes it, :mod:`.catalog` lists, picks and deletes it."""

from __future__ import annotations

from ..errors import ImageError
from .build import BuildResult, boot_robot_script, build_image, render_bake_script
from .catalog import delete_images, latest_image, list_builders, list_images

__all__ = [
    "BuildResult",
    "ImageError",
    "boot_robot_script",
    "build_image",
    "delete_images",
    "latest_image",
    "list_builders",
    "list_images",
    "render_bake_script",
]
