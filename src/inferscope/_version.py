"""The version of inferscope, written here only: pyproject.toml reads it from here, and so does every
lookup at run time. None asks the package metadata: the index's distribution named "inferscope" is
another project, and may be installed beside this one (``inferscope-sdk``)."""

__version__ = "0.1.0"
