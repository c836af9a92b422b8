"""encfs: an envelope-encrypted FUSE filesystem (Huawei SFS encryption emulated locally)."""
