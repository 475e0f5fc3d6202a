"""The package version, in a module of its own: every module that records it imports it from here, not from the
package, whose `__init__` imports the library lazily (an import of the package from inside it is a circle)."""

__version__ = "0.1.0"
