"""The ``defectscope`` command line: parses options, calls the library, prints.

Layer 15 of the data flow; may import any subpackage.
"""

from defectscope.cli.app import main

__all__ = ["main"]
