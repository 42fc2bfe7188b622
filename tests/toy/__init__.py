"""Methods kept outside the package, for the method-protocol tests."""
