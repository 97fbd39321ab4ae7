"""Library code behind the `merge`, `convert`, `generate` and `demo` commands."""
