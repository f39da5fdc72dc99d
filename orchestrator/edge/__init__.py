"""The gRPC edge: server, client, wire parsing, request validation, security (TLS, bearer token)."""
