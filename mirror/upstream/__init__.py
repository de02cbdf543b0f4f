"""The only code that talks to a registry: token auth and the pull API calls."""
