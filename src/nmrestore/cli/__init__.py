"""Command-line interface (``nmrestore ...``): thin wrappers over the library."""
