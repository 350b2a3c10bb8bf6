"""The runtime layer: sandbox lifecycle over a backend, the store and the image store."""
