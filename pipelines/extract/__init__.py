"""Stage one: extraction."""
