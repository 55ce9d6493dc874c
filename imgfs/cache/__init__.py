"""Caches between the store and the views: the snapshot cache of generated layer blobs, the
memory caches of layer indexes and layer trees, and the one persisted cache-file format.

Knows nothing of the mounted tree's names, inode numbers or FUSE.
"""
