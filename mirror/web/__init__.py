"""HTTP in: the server and its accept loop, TLS, the application and its routes."""
