"""Data sets: the synthetic ``shapes`` scenes and questions."""
