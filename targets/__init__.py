"""Bundled target profiles (data only: one TOML per device). Loaded by ``edgetl.targets``."""
