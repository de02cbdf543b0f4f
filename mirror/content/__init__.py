"""Where the mirror keeps what it learned: manifests and tags (metadata) and blobs (disk)."""
