"""Storage tiers behind the ``BlockStore`` protocol: device, pinned CPU, disk, remote."""
