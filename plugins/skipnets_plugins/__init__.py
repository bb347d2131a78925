"""First-party skipnets research callbacks; skipnets finds them through the
``skipnets.plugins`` entry-point group, never by name."""
