"""mirror: a pull-through cache for Docker Hub and other OCI registries."""

__version__ = "0.1.0"
