"""What the mirror does, on top of the content layer and the upstream clients: resolving,
fills, eviction, maintenance, the air gap (seed, export, import), referrers and signatures."""
