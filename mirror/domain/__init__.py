"""The mirror's vocabulary, free of I/O: references, manifests and media types, pins
and access rules, errors, units, cosign signatures."""
