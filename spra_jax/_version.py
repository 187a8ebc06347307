"""The library version, defined once: ``spra_jax.__version__``, the package metadata and saved files all read it here.

Modules inside the package import it from here rather than from ``spra_jax``, so that reading the version never
imports the whole package face (and cannot form an import cycle with it).
"""

__version__ = "0.1.0"
