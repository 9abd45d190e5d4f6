"""Stage two's data: the loader, dense frames, re-augmented views."""
