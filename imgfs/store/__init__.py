"""Reading a containers/storage store: storage.conf, locks, records, manifests, signatures, the
one opener of store files, and the public ``Store``/``Image`` library (DESIGN.md §4).

Uses ``imgfs.layer`` for layer formats; knows nothing of caches, the mounted tree or FUSE.
"""
