"""The FUSE adapter and the daemon: the only package that imports pyfuse3 or trio.

``ops`` maps requests to the views' content API (the one errno boundary); ``daemon`` owns the
mount's life (options, preflight, daemonizing, signals, unmount); ``inodes`` the inode table.
"""
