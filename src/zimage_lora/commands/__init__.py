"""Subcommands of the `zimage-lora` CLI (one module each)."""
