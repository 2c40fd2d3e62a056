"""Mask-aware face recognition pipeline: the library behind the DVC stages in stages/."""
