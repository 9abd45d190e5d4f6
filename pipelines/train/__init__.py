"""Stage two: training and evaluation."""
