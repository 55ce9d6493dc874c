"""Layer formats and assembly: tar-split decoding, tar headers, the offset index, the per-layer
file tree, and verified reassembly of layer blobs.

Knows nothing of the store's layout, locks, caches or FUSE: files are reached through the small
opener protocol of ``imgfs.layer.assemble`` and tar-split bytes arrive as file objects.
"""
