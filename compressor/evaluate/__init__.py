"""Checks of compressed artifacts against the uncompressed baseline, each in the artifact's own runtime."""
