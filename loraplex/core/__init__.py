"""The thin core: config, wrapping and targeting, multi-adapter bookkeeping, files."""
