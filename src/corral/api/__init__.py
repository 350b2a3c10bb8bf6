"""The HTTP API's wire format, shared by the server and the SDK (no I/O here)."""
