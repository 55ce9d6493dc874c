"""imgfs: a containers/storage image store as a read-only filesystem.

The public library API (DESIGN.md §4) is re-exported here; it never imports pyfuse3 or trio.

    import imgfs
    store = imgfs.Store.open()             # the store podman would use
    for image in store.images():
        image.id, image.names, image.digest, image.created
        image.manifest(), image.config(), image.signatures(), image.blobs()
        with image.open_blob(digest) as f: ...
"""

from imgfs.errors import AmbiguousName as AmbiguousName
from imgfs.errors import BlobNotFound as BlobNotFound
from imgfs.errors import ConfigError as ConfigError
from imgfs.errors import CorruptStore as CorruptStore
from imgfs.errors import ImageNotFound as ImageNotFound
from imgfs.errors import ImgfsError as ImgfsError
from imgfs.errors import IntegrityError as IntegrityError
from imgfs.errors import LayerUnavailable as LayerUnavailable
from imgfs.errors import MalformedMetadata as MalformedMetadata
from imgfs.errors import NotFound as NotFound
from imgfs.errors import StoreError as StoreError
from imgfs.errors import StoreNotFound as StoreNotFound
from imgfs.errors import StorePermissionError as StorePermissionError
from imgfs.errors import UnsafePath as UnsafePath
from imgfs.store.image import BlobInfo as BlobInfo
from imgfs.store.image import Image as Image
from imgfs.store.image import Store as Store

__version__ = "0.1.0"

__all__ = [
    "AmbiguousName",
    "BlobInfo",
    "BlobNotFound",
    "ConfigError",
    "CorruptStore",
    "Image",
    "ImageNotFound",
    "ImgfsError",
    "IntegrityError",
    "LayerUnavailable",
    "MalformedMetadata",
    "NotFound",
    "Store",
    "StoreError",
    "StoreNotFound",
    "StorePermissionError",
    "UnsafePath",
    "__version__",
]
