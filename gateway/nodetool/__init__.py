"""`hydrogate node ...`: tools for NodeLink nodes (conformance probe, deploy, node.json)."""
