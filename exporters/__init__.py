"""Exporters from a captured program to deployable artifacts (installed as ``peftc.exporters``)."""
