"""`hydrogate node ...`: tools for NodeLink nodes (conformance probe, firmware deploy, node.json)."""
