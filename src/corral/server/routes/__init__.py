"""The /v1 routers: system (health, templates, tenants), sandboxes, exec, files."""
