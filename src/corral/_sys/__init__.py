"""Thin wrappers over Linux system calls and /proc that the backends share."""
