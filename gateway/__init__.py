"""hydrogate: an edge gateway between NodeLink nodes and ThingsBoard."""

__version__ = "0.1.0"
