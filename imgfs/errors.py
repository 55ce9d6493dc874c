"""The one exception tree of imgfs.

Owns: every error type the core raises. Must not know: errno values, exit codes,
FUSE or the CLI (those translate these classes once, at their own boundary).

    ImgfsError
    ├── StoreError              the store as a whole cannot be used
    │   ├── StoreNotFound       no store at the given or configured path
    │   ├── ConfigError         storage.conf unreadable/invalid; unknown or ambiguous driver
    │   ├── StorePermissionError  the store exists but we may not read it
    │   ├── LockUnusable        a lock file that is no regular file or cannot be opened or locked
    │   └── LockBusy            a writer holds a lock and the caller asked not to wait
    ├── NotFound                a name that does not exist (image, blob)
    │   ├── ImageNotFound
    │   └── BlobNotFound
    ├── AmbiguousName           an ID prefix that matches several images
    ├── UsageError              a wrong command line or mount option
    ├── UnsafeCacheDir          the cache dir (or something in it) is not ours alone
    ├── OutOfResources          no file descriptors (or memory) left for an open
    ├── OverBudget              one request would need more memory than its share of --memory
    ├── MountError              the file system could not be mounted, served or unmounted
    │   ├── FuseUnavailable     /dev/fuse or fusermount3 missing or unusable
    │   ├── MountpointBusy      something is (or was, dead) mounted there, or it is in use
    │   └── NotImgfsMount       ``imgfs -u`` on a mount point of another file system
    ├── Cancelled               work nobody waits for any more (a snapshot whose readers left)
    └── CorruptStore            store content that cannot be served correctly
        ├── MalformedMetadata   JSON/record/tar-split that does not parse or is out of bounds
        ├── LayerUnavailable    layer missing, incomplete, or without tar-split
        │   └── LayerUnreadable  its files exist but we may not open them (rootless store
        │                        without a working user-namespace opener)
        ├── UnsafePath          a name from the store that would leave its directory
        └── IntegrityError      size, CRC-64 or digest mismatch: never serve such bytes

Every message names the image or layer it is about.
"""

from __future__ import annotations


class ImgfsError(Exception):
    """Base class of every error imgfs raises on purpose."""


class StoreError(ImgfsError):
    """The store as a whole cannot be used."""


class StoreNotFound(StoreError):
    """No containers/storage store at the path given or configured."""


class ConfigError(StoreError):
    """storage.conf is invalid, or the driver is unknown, unsupported or ambiguous."""


class StorePermissionError(StoreError):
    """The store exists, but this process may not read it."""


class LockUnusable(StoreError):
    """A store lock file that is not a regular file, or that cannot be opened or locked."""


class LockBusy(StoreError):
    """A writer holds a store lock and this thread asked not to wait (``locks.no_waiting``):
    the caller retries where waiting harms no one."""


class NotFound(ImgfsError):
    """A name (image, blob) that does not exist."""


class ImageNotFound(NotFound):
    """No image with this ID, ID prefix or name."""


class BlobNotFound(NotFound):
    """The image has no blob with this digest."""


class AmbiguousName(ImgfsError):
    """An ID prefix that matches more than one image."""


class UsageError(ImgfsError):
    """The command line or a mount option is wrong."""


class UnsafeCacheDir(ImgfsError):
    """The cache directory, or an entry in it, is not owned by us alone (another user could
    read or plant cache files); nothing in it is used."""


class OutOfResources(ImgfsError):
    """The process has no file descriptors (or kernel memory) left for an open it needs."""


class OverBudget(ImgfsError):
    """One request (a layer tree, a merged directory, a big-data item) would need more memory
    than its share of the daemon's budget (``--memory``): that file fails, the daemon stays
    within the budget."""


class MountError(ImgfsError):
    """The file system could not be mounted, served or unmounted."""


class FuseUnavailable(MountError):
    """FUSE itself (the device or the fusermount3 helper) is missing or unusable."""


class MountpointBusy(MountError):
    """The mountpoint is already a mount point (live or dead), or still in use."""


class NotImgfsMount(MountError):
    """``imgfs -u`` was pointed at a mount point that is not an imgfs mount."""


class Cancelled(ImgfsError):
    """Work that nobody waits for any more, e.g. a layer snapshot all readers released."""


class CorruptStore(ImgfsError):
    """Store content that cannot be served correctly."""


class MalformedMetadata(CorruptStore):
    """Metadata that does not parse, has the wrong shape, or exceeds a bound."""


class LayerUnavailable(CorruptStore):
    """A layer that is missing, incomplete, or has no tar-split to rebuild it from."""


class LayerUnreadable(LayerUnavailable):
    """Layer files that exist but that this process may not open: a rootless store's files
    owned by subordinate uids when the user-namespace opener cannot run (the message says
    which file, its owner and the fix)."""


class UnsafePath(CorruptStore):
    """A path taken from store metadata that would leave its directory."""


class IntegrityError(CorruptStore):
    """Content whose size, CRC-64 or digest does not match what the metadata promises."""
