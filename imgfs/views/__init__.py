"""The mounted tree of DESIGN.md §1: typed node keys, the sections of the tree, the merged root
filesystem, the OCI layout, and the one content API the FUSE adapter calls.

Knows nothing of pyfuse3, trio, inode numbers or errno values.
"""
