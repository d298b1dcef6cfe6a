"""Architecture names as configs write them (``resnet18``, ``resnet18+gn``): parsed without importing
torch or timm, so the coordinator can validate a chain config it never trains."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import LinkSettings

GROUP_NORM_SUFFIX = "+gn"


def split_arch(arch: str) -> tuple[str, bool]:
    """``'resnet18+gn'`` → ``('resnet18', True)``; a plain timm name → ``(name, False)``."""
    if arch.endswith(GROUP_NORM_SUFFIX):
        return arch[: -len(GROUP_NORM_SUFFIX)], True
    return arch, False


def group_norm_arch(arch: str) -> str:
    """The GroupNorm variant's name of ``arch`` (unchanged when it already is one)."""
    return arch if split_arch(arch)[1] else arch + GROUP_NORM_SUFFIX


def student_arch(settings: LinkSettings) -> str:
    """The architecture a link trains: the GroupNorm variant of ``arch`` when privacy is on."""
    return group_norm_arch(settings.arch) if settings.privacy is not None else settings.arch


def warm_start_mismatch(student: str, predecessor: str) -> str | None:
    """Why ``student`` cannot start from ``predecessor``'s weights when only the norm layers differ."""
    (base, gn), (their_base, their_gn) = split_arch(student), split_arch(predecessor)
    if base != their_base or gn == their_gn:
        return None
    ours, theirs = ("GroupNorm", "BatchNorm") if gn else ("BatchNorm", "GroupNorm")
    return (
        f"({student}, {ours}) cannot start from its predecessor's weights ({predecessor}, {theirs}): "
        f"privacy swaps BatchNorm for GroupNorm; set init: scratch for this link, or give both links "
        f"privacy (or arch: {base}+gn)"
    )
