"""The command line: ``mirror serve`` and the maintenance and air-gap commands."""
