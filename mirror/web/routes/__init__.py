"""HTTP in and out: the distribution API and the operational endpoints."""
