"""The sections of the mounted tree, one module each, and the dispatch from a key's type to the
section that owns it.

Each section answers ``node``, ``children``, ``lookup`` and ``open`` for its own key types
(``imgfs.views.keys``); ``Section`` gives the defaults (not a directory, not a file, lookup by
scanning the listing). Sections reach shared per-image state through the ``TreeView``.
"""

from __future__ import annotations

from imgfs.views.keys import (
    BlobKey,
    ByNameKey,
    ImageFileKey,
    ImageKey,
    InstanceKey,
    Key,
    LayerInodeKey,
    LayerKey,
    OciKey,
    PrefixKey,
    RootfsInodeKey,
    RootfsKey,
    RootKey,
    SectionKey,
    SignatureKey,
)
from imgfs.views.sections import (
    blobs,
    byname,
    image,
    instances,
    layers,
    oci,
    root,
    rootfs,
    signatures,
)
from imgfs.views.sections.base import Section

_SECTIONS: dict[type, Section] = {
    RootKey: root.ROOT,
    PrefixKey: root.PREFIX,
    ByNameKey: byname.BY_NAME,
    ImageKey: image.IMAGE,
    ImageFileKey: image.IMAGE_FILE,
    SignatureKey: signatures.SIGNATURES,
    BlobKey: blobs.BLOBS,
    InstanceKey: instances.INSTANCES,
    LayerKey: layers.LAYERS,
    LayerInodeKey: layers.LAYERS,
    RootfsKey: rootfs.ROOTFS,
    RootfsInodeKey: rootfs.ROOTFS,
    OciKey: oci.OCI,
}
_BY_SECTION: dict[str, Section] = {
    "signatures": signatures.SIGNATURES,
    "blobs": blobs.BLOBS,
    "instances": instances.INSTANCES,
    "layers": layers.LAYERS,
}


def section_of(key: Key) -> Section:
    """The section that answers for ``key``."""
    if isinstance(key, SectionKey):
        return _BY_SECTION[key.section]
    return _SECTIONS[type(key)]
