"""Data files shipped with peftc."""
